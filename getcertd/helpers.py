"""Key helper processes (layer 2): the private-key work of enrollments, and the parsing and building around it.

One process per core runs getcertd.keyhelper. ``run(op, arg)`` sends a job (getcertd.keyjobs) to the helper
with the fewest jobs in flight and returns a Deferred of its result. A helper that ends (killed, crashed) fails
its jobs in flight with KeyJobFailed (answered 503: try again) and is started again; the others go on.

Why processes: cryptography releases the GIL during an RSA operation, but everything around it (reading the
CMS, the certificate builder, the CertRep) is Python, and in threads that Python holds the one interpreter lock
the reactor thread needs for every connection. In helpers it runs beside the reactor on the other cores.
"""
import marshal
import os
import struct
import sys

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

from getcertd.errors import KeyJobFailed
from getcertd.keyjobs import decode_result, frame, take_frames

log = Logger()
_ID = struct.Struct(">I")  # a job's number, in front of the job and of its answer
MAX_RESULT = 16 << 20  # a CertRep or a certificate is a few KB; more is a broken helper
RESTART_DELAY = 1.0  # a helper that ends within this long of starting is started again only after it
STOP_TIMEOUT = 10.0  # how long stopping waits for a helper to finish its jobs


class _Pipe:
    """One end of a pipe to a helper, watched by the reactor (IReadDescriptor / IWriteDescriptor)."""

    def __init__(self, fd, on_event):
        self.fd = fd
        self.on_event = on_event

    def fileno(self):
        return self.fd

    def doRead(self):
        return self.on_event()

    doWrite = doRead

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "key helper"


class _Helper(protocol.ProcessProtocol):
    """One helper process. Jobs and results go through two pipes of our own, written and read directly: Twisted's
    process transport would add and remove the pipe from the poller around every write, and at three jobs per
    enrollment those system calls were a good part of the reactor thread's time."""

    def __init__(self, pool, material: bytes):
        self.pool = pool
        self.jobs = {}  # job number -> (op, Deferred)
        self.buffer = bytearray()
        self.out = bytearray()  # jobs not yet taken by the pipe
        self.started = pool.reactor.seconds()
        self.ended = False
        self.closed = defer.Deferred()  # fires when the process has ended
        self.pid = None
        job_read, self.job_write = os.pipe2(os.O_CLOEXEC)
        try:
            self.result_read, result_write = os.pipe2(os.O_CLOEXEC)
        except OSError:
            os.close(job_read)
            os.close(self.job_write)
            raise
        self.child_fds = [job_read, result_write]
        os.set_blocking(self.job_write, False)
        os.set_blocking(self.result_read, False)
        self.reader = _Pipe(self.result_read, self._read)
        self.writer = _Pipe(self.job_write, self._flush)
        self._queue(frame(material))

    def connectionMade(self):
        self.pid = self.transport.pid  # the transport forgets it when the process ends
        for fd in self.child_fds:  # the child has its own copies now
            os.close(fd)
        self.child_fds = []
        self.pool.reactor.addReader(self.reader)

    def send(self, job_id: int, op: str, arg, d: defer.Deferred) -> bool:
        """Give it a job; False if it has gone (its pipe is closed) and can't take one."""
        data = marshal.dumps((op, arg))
        if not self._queue(frame(_ID.pack(job_id), data)):
            return False
        self.jobs[job_id] = (op, d)
        return True

    def _queue(self, frame) -> bool:
        if self.job_write < 0:
            return False
        if self.out:
            self.out += frame
            return True
        try:
            n = os.write(self.job_write, frame)
        except BlockingIOError:
            n = 0
        except OSError:  # gone, and processEnded will say so: no more jobs for it
            self.ended = True
            return False
        if n < len(frame):
            self.out += frame[n:]
            self.pool.reactor.addWriter(self.writer)
        return True

    def _flush(self):
        try:
            n = os.write(self.job_write, self.out)
        except BlockingIOError:
            return
        except OSError:  # gone, as in _queue: its jobs fail when processEnded says so
            self.ended = True
            self.out.clear()
            self.pool.reactor.removeWriter(self.writer)
            return
        del self.out[:n]
        if not self.out:
            self.pool.reactor.removeWriter(self.writer)

    def _read(self):
        try:
            data = os.read(self.result_read, 1 << 18)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.pool.reactor.removeReader(self.reader)
            return
        self.buffer += data
        frames = take_frames(self.buffer, MAX_RESULT)
        while True:
            try:
                answer = next(frames)
            except StopIteration:
                return
            except ValueError as e:
                self._broken(str(e))
                return
            if len(answer) < 5:
                self._broken(f"a frame of {len(answer)} bytes")
                return
            (job_id,) = _ID.unpack_from(answer)
            job = self.jobs.pop(job_id, None)
            if job is None:
                self._broken(f"an answer to job {job_id}, which it was not given")
                return
            op, d = job
            try:
                value = decode_result(op, answer[4:])
            except Exception as e:  # noqa: BLE001 - the job's typed error, for its caller
                d.errback(e)
            else:
                d.callback(value)

    def close_input(self):
        """No more jobs: the helper finishes the ones it has and ends."""
        if self.job_write >= 0:
            self.pool.reactor.removeWriter(self.writer)
            os.close(self.job_write)
            self.job_write = -1

    def errReceived(self, data):
        for line in data.decode("utf-8", "replace").splitlines():
            log.warn("key helper {pid}: {line}", pid=self.pid, line=line)

    def _broken(self, what):
        log.error("key helper {pid} sent {what}; stopping it", pid=self.pid, what=what)
        self.buffer.clear()
        if not self.ended:  # (its last words may be read after it ended)
            self.transport.signalProcess("KILL")

    def processEnded(self, reason):
        self.ended = True
        self._read()  # what it wrote before it ended
        self.pool.reactor.removeReader(self.reader)
        self.close_input()
        os.close(self.result_read)
        jobs, self.jobs = self.jobs, {}
        for op, d in jobs.values():
            d.errback(KeyJobFailed("the key helper stopped during the request"))
        self.pool._ended(self, reason)
        self.closed.callback(None)


class KeyHelpers(service.Service):
    """``size`` helper processes (default: one per CPU) holding the key material ``material``
    (getcertd.keyjobs.KeyMaterial.dumps()); they start and stop with the service. ``stats`` (getcertd.stats)
    counts the helpers started again after one ended."""

    name = "keyhelpers"

    def __init__(self, reactor, material: bytes, size=None, argv=None, stats=None):
        self.reactor = reactor
        self.stats = stats  # counts ("key_helper_restarted",)
        self._material = material
        self.size = max(1, size or os.cpu_count() or 1)
        # -P and "/": "-m" would otherwise put the working directory first on the path, and a getcertd/ there
        # (a checkout, anything in the directory twistd was started from) would be run and sent the keys.
        self._argv = argv or [sys.executable, "-P", "-m", "getcertd.keyhelper"]
        self.helpers = []
        self._next_id = 0
        self._stopping = False
        self._respawn = None  # a delayed start of a helper
        self.restarts = 0

    def startService(self):
        super().startService()
        self._stopping = False
        for _ in range(self.size):
            self._spawn()

    def _spawn(self):
        self._respawn = None
        if self._stopping:
            return
        helper = None
        try:
            helper = _Helper(self, self._material)
            read_jobs, write_results = helper.child_fds
            self.reactor.spawnProcess(helper, self._argv[0], self._argv, env=None,  # None: our environment
                                      path="/", childFDs={0: read_jobs, 1: write_results, 2: "r"})
        except OSError as e:  # no pipe or process could be made (out of descriptors, memory, processes): later
            if helper is not None:
                for fd in helper.child_fds + [helper.job_write, helper.result_read]:
                    os.close(fd)
            log.error("starting a key helper failed: {error}", error=e)
            self._respawn = self.reactor.callLater(RESTART_DELAY, self._spawn)
            return
        self.helpers.append(helper)

    def _ended(self, helper, reason):
        self.helpers.remove(helper)
        if self._stopping:
            return
        signal = getattr(reason.value, "signal", None)
        how = f"was killed by signal {signal}" if signal else \
            f"ended with status {getattr(reason.value, 'exitCode', 0)}"
        log.error("key helper {pid} {how}; starting another", pid=helper.pid, how=how)
        self.restarts += 1
        if self.stats is not None:
            self.stats.count("key_helper_restarted")
        if self.reactor.seconds() - helper.started < RESTART_DELAY:
            self._respawn = self.reactor.callLater(RESTART_DELAY, self._spawn)
        else:
            self._spawn()

    @property
    def pids(self):
        return [h.pid for h in self.helpers if not h.ended]

    def run(self, op: str, arg) -> defer.Deferred:
        """A Deferred of the job's result; its typed error (ScepFailure, MalformedRequest, KeyJobFailed)."""
        d = defer.Deferred()
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        for helper in sorted((h for h in self.helpers if not h.ended), key=lambda h: len(h.jobs)):
            if helper.send(self._next_id, op, arg, d):
                return d
        return defer.fail(KeyJobFailed("no key helper is running"))

    def stopService(self):
        """Close every helper's input (each finishes the jobs it has, then ends); fires when all have ended.
        A helper still running after STOP_TIMEOUT seconds is killed."""
        super().stopService()
        self._stopping = True
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        waits = []
        for helper in list(self.helpers):
            waits.append(helper.closed)
            helper.close_input()
        if not waits:
            return defer.succeed(None)

        def kill():
            for helper in list(self.helpers):
                log.warn("key helper {pid} did not end; killing it", pid=helper.pid)
                helper.transport.signalProcess("KILL")
        killer = self.reactor.callLater(STOP_TIMEOUT, kill)
        return defer.DeferredList(waits).addBoth(lambda _: killer.active() and killer.cancel())
