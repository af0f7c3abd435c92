"""Load for the fault and load tests: enrolling clients and idle connections on asyncio, a heartbeat process.

* :func:`build_messages`: PKCSReq messages built before the clock starts, from a small pool of RSA keys, each
  with its own transactionID (getcertd treats a request as a retry only for the same transactionID).
* :func:`run_load`: ``concurrency`` keep-alive TLS clients that POST those messages back to back for
  ``duration`` seconds (or until the messages run out), timing every request; optional idle connections held
  open (TLS handshake done, then silent) for the whole run. Replies are kept and checked afterwards
  (:func:`check_replies`), so the client does no private-key work while the clock runs.
* A heartbeat, in a process of its own so that the load generator's work doesn't delay it: GetCACaps every
  ``interval`` on one keep-alive TLS connection until SIGTERM, then one JSON line of samples on stdout::

      python tests/loadgen.py heartbeat PORT CAFILE [INTERVAL]

  :class:`Heartbeat` starts and stops it.
"""
import asyncio
import base64
import collections
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
PKI_PATH = "/scep?operation=PKIOperation"


# ---------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------

@dataclass
class Message:
    requester: object  # scepclient.Requester (its key signs, and the CertRep is encrypted to its certificate)
    tid: str
    nonce: bytes
    der: bytes


def build_messages(ca_certs, keys, count, challenge=None, cn="ignored-by-server"):
    """``count`` PKCSReq messages round-robin over ``keys``, each with a fresh transactionID."""
    from scepclient import Requester, csr_der
    requesters = [Requester(ca_certs, key=k) for k in keys]
    inner = [csr_der(k, cn, challenge) for k in keys]
    out = []
    for i in range(count):
        r = requesters[i % len(keys)]
        tid = uuid.uuid4().hex.upper()
        der = r.message(transaction_id=tid, inner=inner[i % len(keys)])
        out.append(Message(r, tid, r.nonce, der))
    return out


def open_reply(message: Message, der: bytes):
    """(CertRep, certificates) for ``message``; AssertionError if the reply is not a CertRep for it."""
    from getcertd import scep
    rep = scep.parse_signed(der)
    assert rep.message_type == scep.MessageType.CertRep
    assert rep.transaction_id == message.tid and rep.recipient_nonce == message.nonce
    certs = []
    if rep.pki_status == scep.PkiStatus.SUCCESS:
        plaintext, _ = scep.decrypt_envelope(rep.content, message.requester.signer_key, message.requester.signer)
        certs, _crls = scep.parse_degenerate(plaintext)
    return rep, certs


# ---------------------------------------------------------------------------------------------------
# HTTP/1.1 on asyncio streams
# ---------------------------------------------------------------------------------------------------

async def read_response(reader):
    """(status, headers with lower-case names, body, server closes) of one response."""
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("closed before a response")
    parts = line.split(b" ", 2)
    status = int(parts[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        body = await reader.read()
        headers["connection"] = "close"
    return status, headers, body, headers.get("connection", "").lower() == "close"


def request_bytes(method, path, headers=None, body=b""):
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if method == "POST":
        lines += ["Content-Type: application/x-pki-message", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def basic_header(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ---------------------------------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------------------------------

@dataclass
class Result:
    message: Optional[Message]
    outcome: str  # "200", "503", ... or "hang", "connection: ExcName"
    started: float
    elapsed: float
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    worker: int = 0
    connect: float = 0.0  # of elapsed, the time spent opening a connection (TCP and TLS handshake) first

    @property
    def answer_time(self):
        """From the request's first byte sent to its answer's last byte read."""
        return self.elapsed - self.connect


@dataclass
class LoadReport:
    results: List[Result]
    duration: float
    idle_opened: int = 0
    idle_failed: collections.Counter = field(default_factory=collections.Counter)
    idle_answers: collections.Counter = field(default_factory=collections.Counter)  # what idle ones got, if any
    unused_messages: int = 0

    def outcomes(self):
        return collections.Counter(r.outcome for r in self.results)

    def max_latency(self):
        return max((r.elapsed for r in self.results), default=0.0)


def client_context(cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    return ctx


async def _connect(port, ctx, source):
    return await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost",
                                         local_addr=(source, 0) if source else None)


async def _worker(n, port, ctx, queue, results, clock, headers_for, timeout, source, pause_after, delay, think,
                  preconnect, per_worker):
    conn = None
    rng = random.Random(n)
    if preconnect:  # connected before the clock starts, then all at once
        try:
            conn = await _connect(port, ctx, source)
        except (OSError, ssl.SSLError):
            conn = None  # tried again with the first request, and timed with it
        clock["connected"].append(n)
        await clock["start"]
    await asyncio.sleep(delay)
    done = 0
    while time.monotonic() < clock["stop_at"] and queue and (per_worker is None or done < per_worker):
        done += 1
        message = queue.popleft()
        started = time.monotonic()
        connect = 0.0
        try:
            async def exchange():
                nonlocal conn, connect
                if conn is None:
                    conn = await _connect(port, ctx, source)
                    connect = time.monotonic() - started
                reader, writer = conn
                writer.write(request_bytes("POST", PKI_PATH, headers_for(n), message.der))
                await writer.drain()
                return await read_response(reader)
            status, headers, body, close = await asyncio.wait_for(exchange(), timeout)
            results.append(Result(message, str(status), started, time.monotonic() - started, headers, body, n,
                                  connect))
        except asyncio.TimeoutError:
            results.append(Result(message, "hang", started, time.monotonic() - started, worker=n, connect=connect))
            close = True
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError) as e:
            results.append(Result(message, f"connection: {type(e).__name__}", started,
                                  time.monotonic() - started, worker=n))
            close = True
        if close and conn is not None:
            conn[1].close()
            conn = None
        pause = pause_after.get(results[-1].outcome) or (rng.uniform(*think) if think else 0)
        if pause:
            await asyncio.sleep(min(pause, max(0.0, clock["stop_at"] - time.monotonic())))
    if conn is not None:
        conn[1].close()


async def _idle(port, ctx, held, failed, answers, done):
    try:
        reader, writer = await _connect(port, ctx, None)
    except (OSError, ssl.SSLError) as e:
        failed[type(e).__name__] += 1
        return
    held.append(writer)
    try:
        # An idle client sends nothing; anything the server says (a 503 past the cap, a 408) is noted.
        read = asyncio.ensure_future(reader.read(200))
        finished, _ = await asyncio.wait([read, done], return_when=asyncio.FIRST_COMPLETED)
        if read in finished:
            data = read.result()
            answers[data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"] += 1
        else:
            read.cancel()
    except (OSError, ssl.SSLError) as e:
        answers[f"connection: {type(e).__name__}"] += 1
    finally:
        writer.close()


async def _run(port, cafile, messages, concurrency, duration, headers_for, timeout, idle, idle_rate, sources,
               pause_after, on_started, ramp, think, preconnect, per_worker):
    loop = asyncio.get_running_loop()
    ctx = client_context(cafile)
    queue = collections.deque(messages)
    results = []
    held, failed, answers = [], collections.Counter(), collections.Counter()
    done = loop.create_future()
    idle_tasks = []
    for i in range(idle):  # opened before the clock starts, at a bounded rate
        idle_tasks.append(asyncio.ensure_future(_idle(port, ctx, held, failed, answers, done)))
        if idle_rate and i % idle_rate == idle_rate - 1:
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 60
    while len(held) + sum(failed.values()) + sum(answers.values()) < idle and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    idle_opened = len(held)
    clock = {"stop_at": float("inf"), "start": loop.create_future(), "connected": []}
    workers = [asyncio.ensure_future(_worker(n, port, ctx, queue, results, clock, headers_for, timeout,
                                             sources[n % len(sources)] if sources else None, pause_after,
                                             0 if preconnect else ramp * n / concurrency, think, preconnect,
                                             per_worker))
               for n in range(concurrency)]
    if preconnect:
        while len(clock["connected"]) < concurrency and time.monotonic() < deadline + 60:
            await asyncio.sleep(0.05)
    if on_started:
        on_started()
    t0 = time.monotonic()
    clock["stop_at"] = t0 + duration
    clock["start"].set_result(None)
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - t0
    done.set_result(None)
    await asyncio.gather(*idle_tasks)
    return LoadReport(results, elapsed, idle_opened, failed, answers, len(queue))


def run_load(port, cafile, messages, concurrency, duration, headers_for, timeout=30.0, idle=0, idle_rate=50,
             sources=None, pause_after=None, on_started=None, nice=10, ramp=1.0, think=None, preconnect=False,
             per_worker=None) -> LoadReport:
    """Run the load (see the module docstring) and return what every request got.

    ``headers_for(worker)`` gives each worker's extra request headers (Authorization); ``sources`` are local
    addresses (127.0.0.x) the workers connect from, round-robin; ``timeout`` is where a request counts as a
    hang; ``think`` is a (low, high) range of pauses between a worker's requests (None: back to back);
    ``pause_after`` maps an outcome to a pause before the worker's next request instead; ``on_started`` is called
    when the idle connections are up and the clock starts. With ``preconnect`` every worker connects before the
    clock starts and all send their first request at once; ``per_worker`` caps the requests of each worker.
    Otherwise the workers start one after another over ``ramp``
    seconds, as clients do (a burst of simultaneous TLS handshakes is a separate matter: each costs the reactor
    about a millisecond).

    The load runs in a thread of its own at ``nice`` (Linux sets priorities per thread): the clients stand for
    machines elsewhere, and on a small test machine they should not take the CPU from the appliance first.
    """
    out = []

    def run():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            pass
        try:
            out.append(asyncio.run(_run(port, cafile, messages, concurrency, duration, headers_for, timeout, idle,
                                        idle_rate, sources, pause_after or {}, on_started, ramp, think,
                                        preconnect, per_worker)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out.append(e)
    thread = threading.Thread(target=run, name="load")
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def check_replies(report: LoadReport):
    """Open every 200 reply: {"SUCCESS": [(message, certificate)], "FAILURE": [(message, CertRep)], ...}."""
    from getcertd import scep
    out = collections.defaultdict(list)
    for r in report.results:
        if r.outcome != "200":
            continue
        rep, certs = open_reply(r.message, r.body)
        if rep.pki_status == scep.PkiStatus.SUCCESS:
            assert len(certs) == 1
            assert certs[0].public_key().public_numbers() == r.message.requester.key.public_key().public_numbers()
            out["SUCCESS"].append((r, certs[0]))
        else:
            out[rep.pki_status.name].append((r, rep))
    return out


# ---------------------------------------------------------------------------------------------------
# Process figures
# ---------------------------------------------------------------------------------------------------

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """Samples a process's RSS and open descriptors every ``interval`` seconds in a thread."""

    def __init__(self, pid, interval=0.25):
        self.pid = pid
        self.interval = interval
        self.samples = []  # (monotonic time, RSS KiB, fds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), rss_kib(self.pid), open_fds(self.pid)))
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval)

    def _schedstat(self):
        """(CPU seconds, seconds waiting for a CPU) of the process's main thread (the reactor's) so far."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/schedstat") as f:
                run, wait = f.read().split()[:2]
            return int(run) / 1e9, int(wait) / 1e9
        except (OSError, ValueError):
            return 0.0, 0.0

    def __enter__(self):
        self._sched = self._schedstat()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        end = self._schedstat()
        self.reactor_cpu, self.reactor_runqueue_wait = (round(b - a, 2) for a, b in zip(self._sched, end))

    def peak_rss(self):
        return max(s[1] for s in self.samples)

    def peak_fds(self):
        return max(s[2] for s in self.samples)


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


# ---------------------------------------------------------------------------------------------------
# The heartbeat
# ---------------------------------------------------------------------------------------------------

class Heartbeat:
    """The heartbeat process: start() waits until its first answer; stop() returns its samples.

    Samples are (monotonic start time, seconds) per GetCACaps; ``errors`` anything but a 200.
    """

    def __init__(self, port, cafile, interval=0.05):
        self.args = [sys.executable, os.path.join(HERE, "loadgen.py"), "heartbeat", str(port), cafile,
                     str(interval)]
        self.proc = None
        self.samples = []
        self.errors = []

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_raise_priority)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError("heartbeat did not start: " + line + self.proc.stderr.read())
        return self

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(30)
        data = json.loads(out)
        self.samples = [tuple(s) for s in data["samples"]]
        self.errors = data["errors"]
        return self

    def latencies(self, start=None, end=None):
        return [s[1] for s in self.samples if (start is None or s[0] >= start) and (end is None or s[0] <= end)]

    @staticmethod
    def summary(latencies):
        return {"n": len(latencies), "p50_ms": round(1000 * percentile(latencies, 50), 1),
                "p99_ms": round(1000 * percentile(latencies, 99), 1),
                "max_ms": round(1000 * max(latencies, default=float("nan")), 1)}


def _raise_priority():
    """The heartbeat measures the appliance: it should not wait for a CPU itself (root may raise it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -5)
    except OSError:
        pass


def _heartbeat_main(port, cafile, interval):
    import http.client
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ctx = ssl.create_default_context(cafile=cafile)
    samples, errors = [], []
    conn = None

    def get():
        nonlocal conn
        if conn is None:
            conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=30)
        conn.request("GET", "/scep?operation=GetCACaps")
        r = conn.getresponse()
        body = r.read()
        if r.status != 200 or b"POSTPKIOperation" not in body:
            raise RuntimeError(f"status {r.status}")
    get()  # connect (TLS handshake) before timing
    print("ready", flush=True)
    next_tick = time.monotonic()
    while not stop:
        t0 = time.monotonic()
        try:
            get()
            samples.append((t0, time.monotonic() - t0))
        except Exception as e:  # noqa: BLE001 - every failure is reported
            errors.append((t0, f"{type(e).__name__}: {e}"))
            if conn is not None:
                conn.close()
            conn = None
        next_tick += interval
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_tick = time.monotonic()
    print(json.dumps({"samples": samples, "errors": errors}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "heartbeat":
        _heartbeat_main(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 0.05)
