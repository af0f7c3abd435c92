"""A key helper process: ``python -m getcertd.keyhelper``, started by getcertd.helpers (an edge, like tap.py).

It reads frames from stdin and writes frames to stdout. Every frame is a 4-byte big-endian length and that many
bytes. The first frame is the key material (getcertd.keyjobs.KeyMaterial.dumps); each later one is a job: a
4-byte job number and a marshal'd (operation, argument). Each answer is the job number and its result
(getcertd.keyjobs.encode_result / encode_error). It ends at the end of its input.
"""
import marshal
import os
import signal
import sys

NICENESS = 10  # below the appliance's reactor thread: it serves every connection and goes first


def _frames(fd: int):
    """The frames read from ``fd``, in as few reads as there is data for."""
    from getcertd.keyjobs import take_frames
    buf = bytearray()
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            if buf:
                raise EOFError("the appliance closed the pipe inside a frame")
            return
        buf += chunk
        yield from take_frames(buf)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve(read_fd: int, write_fd: int) -> None:
    from getcertd import keyjobs
    frames = _frames(read_fd)
    material = keyjobs.KeyMaterial.loads(next(frames))
    ops = keyjobs.OPS
    for frame in frames:
        job_id = frame[:4]
        try:
            op, arg = marshal.loads(frame[4:])
            result = keyjobs.encode_result(op, ops[op](material, arg))
        except Exception as e:  # noqa: BLE001 - every failure becomes a typed answer for this job
            result = keyjobs.encode_error(e)
        _write(write_fd, keyjobs.frame(job_id, result))


def main() -> None:
    # systemd's stop (KillMode=control-group) and a terminal's Ctrl-C signal every process of the appliance at
    # once; a helper must not die then: the appliance is finishing its enrollments in progress, and a helper
    # ends when the appliance closes its input (after that), or when the appliance is gone (end of input).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.nice(NICENESS)
    except OSError:
        pass
    read_fd, write_fd = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout = sys.stderr  # nothing else may write into the answer pipe
    try:
        serve(read_fd, write_fd)
    except (BrokenPipeError, EOFError):  # the appliance is gone: nobody is left to answer
        pass


if __name__ == "__main__":
    main()
