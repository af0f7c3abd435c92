"""A small pool of threads with a cheap hand-back (layer 2): the journal's writes and fsyncs run in one.

Twisted's own thread pool (``deferToThreadPool``) costs about 60 to 100 us of CPU per job on this kind of
machine (its worker team, context propagation, and one reactor wake-up per result), paid while holding the
GIL. :class:`WorkerPool` does less: jobs go through a C ``SimpleQueue``, and finished jobs are handed back in
batches: a worker wakes the reactor only when no hand-back is already pending, and the reactor fires every
finished job's Deferred in one go. (The CA's and RA's key work runs in processes: getcertd.helpers.)
"""
import os
import queue
import threading
from collections import deque

from twisted.application import service
from twisted.internet import defer
from twisted.python.failure import Failure

_STOP = object()


class WorkerPool(service.Service):
    """``run(f, *args)`` calls ``f(*args)`` in one of ``size`` threads; returns a Deferred of its result.

    :param reactor: fires the Deferreds on its thread (``callFromThread``).
    :param size: the number of threads; default: the number of CPUs.

    The threads start with the service (or with the first job) and stop with it, after finishing the jobs
    already queued. A job submitted after stopping fails with RuntimeError.
    """

    name = "workers"

    def __init__(self, reactor, size=None, thread_name="getcertd-worker"):
        self._reactor = reactor
        self.size = max(1, size or os.cpu_count() or 1)
        self._thread_name = thread_name
        self._jobs = queue.SimpleQueue()
        self._done = deque()  # (deferred, ok, result) appended by workers, drained by the reactor
        self._lock = threading.Lock()
        self._wake_pending = False
        self._threads = []
        self._stopped = False

    def startService(self):
        super().startService()
        self._start()

    def stopService(self):
        super().stopService()
        return self.stop()

    def _start(self):
        if self._threads or self._stopped:
            return
        for i in range(self.size):
            t = threading.Thread(target=self._work, name=f"{self._thread_name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def run(self, f, *args, **kwargs) -> defer.Deferred:
        if self._stopped:
            return defer.fail(RuntimeError("the worker pool is stopped"))
        if not self._threads:
            self._start()
        d = defer.Deferred()
        self._jobs.put((d, f, args, kwargs))
        return d

    __call__ = run

    def stop(self) -> defer.Deferred:
        """Finish the queued jobs, then end the threads; fires when they have ended (joined off the reactor)."""
        if self._stopped:
            return defer.succeed(None)
        self._stopped = True
        threads = self._threads
        for _ in threads:
            self._jobs.put(_STOP)
        if not threads:
            return defer.succeed(None)
        joined = defer.Deferred()

        def join():
            for t in threads:
                t.join()
            self._reactor.callFromThread(joined.callback, None)
        threading.Thread(target=join, name=f"{self._thread_name}-join", daemon=True).start()
        return joined

    def _work(self):
        get = self._jobs.get
        while True:
            job = get()
            if job is _STOP:
                return
            d, f, args, kwargs = job
            try:
                outcome = (d, True, f(*args, **kwargs))
            except BaseException:
                outcome = (d, False, Failure())
            self._done.append(outcome)
            with self._lock:
                if self._wake_pending:
                    continue
                self._wake_pending = True
            self._reactor.callFromThread(self._deliver)

    def _deliver(self):
        with self._lock:
            self._wake_pending = False
        done = self._done
        while done:
            d, ok, result = done.popleft()
            if ok:
                d.callback(result)
            else:
                d.errback(result)
