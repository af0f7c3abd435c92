"""A small pool of threads for the private-key work of enrollments (layer 2).

cryptography releases the GIL during RSA private-key operations, so with one worker per core the reactor
thread keeps serving HTTP while the CA and RA keys sign and decrypt on the other cores. A job should be that
operation and nothing else (see getcertd.enroll): Python in a worker holds the GIL, and the reactor thread,
which lets go of it at every socket and OpenSSL call, then waits to get it back.

Twisted's own thread pool (``deferToThreadPool``) costs about 60 to 100 us of CPU per job on this kind of
machine (its worker team, context propagation, and one reactor wake-up per result). An enrollment makes three
jobs, and that overhead is paid while holding the GIL, so :class:`WorkerPool` does less: jobs go
through a C ``SimpleQueue``, and finished jobs are handed back in batches: a worker wakes the reactor only
when no hand-back is already pending, and the reactor fires every finished job's Deferred in one go.
"""
import os
import queue
import sys
import threading
from collections import deque

from twisted.application import service
from twisted.internet import defer
from twisted.python.failure import Failure

_STOP = object()
NICENESS = 10  # how far below the reactor thread the workers run


def _lower_priority(increment: int) -> None:
    """Run the calling thread ``increment`` nice levels lower (Linux: priorities are per thread there).

    At saturation the workers and the reactor thread compete for the cores, and the reactor thread, which serves
    every connection and every timer, used to wait longer for a CPU than it ran. Lower, the workers still get every
    cycle it leaves, and it goes first. Elsewhere PRIO_PROCESS with a thread ID would name a process: left alone.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError:
        pass


class WorkerPool(service.Service):
    """``run(f, *args)`` calls ``f(*args)`` in one of ``size`` threads; returns a Deferred of its result.

    :param reactor: fires the Deferreds on its thread (``callFromThread``).
    :param size: the number of threads; default: the number of CPUs.
    :param niceness: how many nice levels below the reactor thread the threads run (Linux).

    The threads start with the service (or with the first job) and stop with it, after finishing the jobs
    already queued. A job submitted after stopping fails with RuntimeError.
    """

    name = "workers"

    def __init__(self, reactor, size=None, thread_name="getcertd-crypto", niceness=NICENESS):
        self._reactor = reactor
        self._niceness = niceness
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
        if self._niceness:
            _lower_priority(self._niceness)
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
