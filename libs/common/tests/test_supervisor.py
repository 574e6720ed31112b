"""The supervisor of `make run`: a child that exits is restarted with backoff; only a stop ends it."""

from __future__ import annotations

import signal
import sys
import time

from crm_common.supervisor import Backoff, Supervisor


def _run(sup: Supervisor, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sup.step()
        time.sleep(0.01)


def test_backoff_doubles_from_base_up_to_the_cap():
    b = Backoff(base_s=0.5, cap_s=30)
    assert [b.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_a_child_that_keeps_exiting_is_restarted_with_doubling_delays_and_each_exit_is_logged():
    said: list[str] = []
    sup = Supervisor(say=said.append, backoff=Backoff(base_s=0.05, cap_s=0.2, reset_after_s=60))
    sup.add("flaky", [sys.executable, "-c", "raise SystemExit(3)"])
    _run(sup, 1.5)
    sup.stop_all(timeout=5)
    assert said[:4] == [
        "flaky exited with 3; restart #1 in 0.05 s",
        "flaky exited with 3; restart #2 in 0.1 s",
        "flaky exited with 3; restart #3 in 0.2 s",
        "flaky exited with 3; restart #4 in 0.2 s",
    ]
    assert set(sup.children["flaky"].exits) == {3}


def test_a_child_that_ran_long_enough_restarts_after_the_base_delay_again():
    said: list[str] = []
    sup = Supervisor(say=said.append, backoff=Backoff(base_s=0.05, cap_s=10, reset_after_s=0.2))
    sup.add("steady", [sys.executable, "-c", "import time; time.sleep(0.3)"])
    _run(sup, 2.5)
    sup.stop_all(timeout=5)
    assert len(said) >= 2
    assert all(line.endswith("in 0.05 s") for line in said), said


def test_kill_9_is_restarted_and_a_stop_ends_the_child_for_good(tmp_path):
    said: list[str] = []
    sup = Supervisor(say=said.append, backoff=Backoff(base_s=0.05), pid_dir=tmp_path)
    sup.add("svc", [sys.executable, "-c", "import time; time.sleep(60)"])
    first = sup.pid("svc")
    assert first is not None and (tmp_path / "svc.pid").read_text() == str(first)
    assert sup.kill("svc") == first
    _run(sup, 0.5)
    second = sup.pid("svc")
    assert second is not None and second != first
    assert (tmp_path / "svc.pid").read_text() == str(second)
    assert said == ["svc exited with -9 (SIGKILL); restart #1 in 0.05 s"]
    sup.stop_all(timeout=5)
    assert not sup.alive("svc")
    assert sup.children["svc"].exits == [-signal.SIGKILL]
    _run(sup, 0.3)
    assert not sup.alive("svc") and not (tmp_path / "svc.pid").exists()
