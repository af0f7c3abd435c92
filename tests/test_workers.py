"""getcertd.workers.WorkerPool: jobs run off the reactor thread, results and errors come back as Deferreds."""
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from getcertd.workers import WorkerPool


@pytest_twisted.inlineCallbacks
def test_jobs_run_in_the_pool_threads_and_results_come_back_on_the_reactor():
    pool = WorkerPool(reactor, size=2)
    pool.startService()
    main = threading.get_ident()
    seen = []

    def job(i):
        seen.append(threading.current_thread().name)
        return i * i, threading.get_ident() != main

    results = yield defer.gatherResults([pool.run(job, i) for i in range(200)])
    assert results == [(i * i, True) for i in range(200)]
    assert set(seen) <= {"getcertd-worker-0", "getcertd-worker-1"}
    fired_on = []
    yield pool.run(lambda: None).addCallback(lambda _: fired_on.append(threading.get_ident()))
    assert fired_on == [main]
    yield pool.stopService()


@pytest_twisted.inlineCallbacks
def test_errors_are_failures_of_the_job():
    pool = WorkerPool(reactor, size=1)

    def boom():
        raise ValueError("no")
    with pytest.raises(ValueError, match="no"):
        yield pool.run(boom)
    assert (yield pool.run(lambda a, b=0: a + b, 1, b=2)) == 3  # the pool still works; threads start on demand
    yield pool.stop()


@pytest_twisted.inlineCallbacks
def test_stop_finishes_the_queued_jobs_and_refuses_new_ones():
    pool = WorkerPool(reactor, size=1)
    gate = threading.Event()
    first = pool.run(gate.wait, 5)
    rest = [pool.run(lambda i=i: i) for i in range(5)]
    stopped = pool.stop()
    gate.set()
    assert (yield first) is True
    assert (yield defer.gatherResults(rest)) == list(range(5))
    yield stopped
    with pytest.raises(RuntimeError):
        yield pool.run(lambda: 1)
    yield pool.stop()  # again: nothing to do
