"""Keep a set of child processes running: the supervisor of `make run` (and of the chaos tests).

A child that exits, for whatever reason (a crash, an OOM kill, `kill -9`), is started again after a
backoff: 0.5 s, doubling with each exit in a row up to 30 s, back to 0.5 s once a child has stayed
up for 60 s. So a service that crashes once is back within a second, and one that cannot start at
all (a bad setting) is retried every 30 s without spinning. The supervisor is driven by its
caller's loop (`step()`), so it holds no thread and the caller decides when to stop; only a stop
(`stop_all`) ends the children for good.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True)
class Backoff:
    """How long to wait before the next start of a child that exited `streak` times in a row."""

    base_s: float = 0.5
    cap_s: float = 30.0
    # A child up at least this long before it exited starts its streak again.
    reset_after_s: float = 60.0

    def delay(self, streak: int) -> float:
        return float(min(self.cap_s, self.base_s * 2 ** max(0, streak - 1)))


@dataclass
class Child:
    name: str
    argv: list[str]
    env: Mapping[str, str] | None
    stdout: IO[Any] | int | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    # Every restart so far (the `#n` of the log line) and the exits in a row without a long run.
    restarts: int = 0
    streak: int = 0
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Start children, restart those that exit (with `Backoff`), stop them all when asked.

    Each child runs in a session of its own (so a signal to the terminal's group does not reach it
    before the supervisor decides), and its pid is written to `pid_dir/<name>.pid` at every start.
    """

    def __init__(
        self,
        *,
        say: Callable[[str], None],
        backoff: Backoff | None = None,
        pid_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.say = say
        self.backoff = backoff or Backoff()
        self.pid_dir = pid_dir
        self.clock = clock
        self.children: dict[str, Child] = {}
        self.stopped = False

    def add(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stdout: IO[Any] | int | None = None,
    ) -> Child:
        """Register a child and start it now."""
        child = Child(name=name, argv=list(argv), env=env, stdout=stdout)
        self.children[name] = child
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(
            child.argv,
            env=dict(child.env) if child.env is not None else None,
            stdout=child.stdout,
            stderr=subprocess.STDOUT if child.stdout not in (None, subprocess.DEVNULL) else child.stdout,
            start_new_session=True,
        )
        child.started_at = self.clock()
        child.restart_at = None
        if self.pid_dir is not None:
            self.pid_dir.mkdir(parents=True, exist_ok=True)
            (self.pid_dir / f"{child.name}.pid").write_text(str(child.proc.pid))

    def alive(self, name: str) -> bool:
        proc = self.children[name].proc
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int | None:
        proc = self.children[name].proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def step(self) -> None:
        """Notice exits and schedule their restarts; start the children whose backoff is over."""
        if self.stopped:
            return
        now = self.clock()
        for child in self.children.values():
            proc = child.proc
            if child.restart_at is None and proc is not None and proc.poll() is not None:
                rc = proc.returncode
                child.exits.append(rc)
                up_for = now - child.started_at
                child.streak = 1 if up_for >= self.backoff.reset_after_s else child.streak + 1
                child.restarts += 1
                delay = self.backoff.delay(child.streak)
                child.restart_at = now + delay
                self.say(f"{child.name} exited with {_describe(rc)}; restart #{child.restarts} in {delay:g} s")
            elif child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int | None:
        """Send `sig` to a child's whole process group (a crash, for tests); answer the pid."""
        pid = self.pid(name)
        if pid is not None:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return None
        return pid

    def stop_all(self, timeout: float = 35, names: Sequence[str] | None = None) -> None:
        """SIGTERM the children (all, or `names` in that order of signalling), wait up to `timeout`
        s, then SIGKILL what is left; no restart happens afterwards."""
        self.stopped = True
        chosen = [self.children[n] for n in names] if names is not None else list(self.children.values())
        for child in chosen:
            child.restart_at = None
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in chosen:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
        if self.pid_dir is not None:
            for child in chosen:
                (self.pid_dir / f"{child.name}.pid").unlink(missing_ok=True)


def _describe(rc: int) -> str:
    """`-9 (SIGKILL)` for a signal, the code otherwise."""
    if rc < 0:
        try:
            return f"{rc} ({signal.Signals(-rc).name})"
        except ValueError:
            return str(rc)
    return str(rc)
