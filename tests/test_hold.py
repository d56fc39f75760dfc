"""The warmup llama-server's process stopped while users wait (bioproxy/hold.py), on a real
child process that stands in for it: its state is what the kernel reports."""

import subprocess
import sys

import gevent
import pytest

from bioproxy import hold
from bioproxy.hold import Hold

PORT = 18082


@pytest.fixture
def process():
    """A process whose command line names --port PORT, as llama-server's does."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "--port", str(PORT)]
    )
    for _ in range(100):  # until it runs that command (Popen may return before its exec)
        with open(f"/proc/{child.pid}/cmdline", "rb") as f:
            if b"--port" in f.read():
                break
        gevent.sleep(0.01)
    yield child
    child.kill()
    child.wait()


def state(child):
    """The kernel's one-letter state of the process: T when stopped."""
    with open(f"/proc/{child.pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def stopped(child):
    """Whether it is stopped, once a signal just sent has had time to arrive (they are
    delivered when the process is next scheduled)."""
    for _ in range(50):
        gevent.sleep(0.01)
        if state(child) == "T":
            return True
    return False


def running(child):
    for _ in range(50):
        gevent.sleep(0.01)
        if state(child) != "T":
            return True
    return False


def test_stopped_only_while_it_evaluates_and_a_user_waits(process):
    h = Hold(process.pid, PORT)
    assert h.problem is None
    with h.user():
        assert running(process)  # nothing to stop it for: it is not evaluating
    with h.evaluation():
        assert running(process)
        with h.user(), h.user():
            assert stopped(process)
        assert running(process)  # the last user got its first byte
    assert h.holds == 1 and h.held_seconds > 0
    assert h.describe()["stopped"] is False


def test_a_user_already_waiting_stops_an_evaluation_that_starts(process):
    h = Hold(process.pid, PORT)
    with h.user():
        with h.evaluation():
            assert stopped(process)
        assert running(process)  # its save is never held


def test_another_process_is_never_signalled(process):
    h = Hold(process.pid, PORT + 1)
    assert "not a llama-server on port" in h.problem
    with h.evaluation(), h.user():
        assert running(process)


def test_a_stretch_of_users_stops_it_at_most_hold_max(process, monkeypatch):
    monkeypatch.setattr(hold, "HOLD_MAX", 0.05)
    h = Hold(process.pid, PORT)
    with h.evaluation():
        with h.user():
            assert stopped(process)
            gevent.sleep(0.2)
            assert running(process)  # running again, though a user still waits
            with h.user():
                assert running(process)  # and it stays so until no user waits
        with h.user():
            assert stopped(process)  # a new stretch


def test_an_evaluation_is_stopped_at_most_its_budget_in_all(process):
    h = Hold(process.pid, PORT, budget=0.15)
    with h.evaluation():
        for _ in range(3):  # users with short gaps between them
            with h.user():
                gevent.sleep(0.1)
        assert 0.14 <= h.held_seconds < 0.3
        with h.user():
            assert running(process)  # the budget is spent: not stopped again
    with h.evaluation(), h.user():
        assert stopped(process)  # the next evaluation has a budget of its own


def test_a_process_that_ended_is_said_and_left_alone(process):
    h = Hold(process.pid, PORT)
    process.kill()
    process.wait()
    with h.evaluation(), h.user():
        pass
    assert "cannot be signalled" in h.problem
    assert h.stopped is False


def test_a_new_worker_continues_a_process_left_stopped(process):
    Hold(process.pid, PORT)._signal(hold.signal.SIGSTOP)  # a worker that died holding it
    assert stopped(process)
    Hold(process.pid, PORT)
    assert running(process)
