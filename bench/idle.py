"""Idle cost of the platform: start the embedded stack, leave it idle, measure the CPU it burns.

    .venv/bin/python bench/idle.py [--seconds 60] [--settle 20]

Starts `python -m crm_common.devstack run` on ports of its own (a separate .local directory, so
a running `make run` is not disturbed), waits until every service answers /readyz, lets it
settle, then reads the CPU time of every platform process (the devstack, the five services, the
local provider sinks, the broker, and PostgreSQL with all its backends) from /proc over the
window. Prints `BENCH idle_cpu_percent <v>`: that CPU as a percentage of one core. Target: 3.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from crm_common.testing.bench import TICKS, command_line, cpu_ticks, descendants

ROOT = Path(__file__).resolve().parents[1]


def _per_process(pids: set[int]) -> dict[int, tuple[str, int]]:
    return {pid: (command_line(pid)[:90], cpu_ticks(pid)) for pid in pids}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--settle", type=float, default=20)
    parser.add_argument("--port-offset", type=int, default=21000)
    args = parser.parse_args()

    local = Path(tempfile.mkdtemp(prefix="crm-idle-"))
    os.chmod(local, 0o755)
    offset = args.port_offset
    env = {
        **os.environ,
        "CRM_LOCAL_DIR": str(local),
        "CRM_PORT_OFFSET": str(offset),
        "CRM_PG_PORT": str(55432 + offset % 5000),
        "CRM_BROKER_PORT": str(19092 + offset % 5000),
        "CRM_LOG_JSON": "false",
    }
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    log = open(local / "devstack.log", "wb")
    stack = subprocess.Popen(
        [sys.executable, "-m", "crm_common.devstack", "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ports = [8001 + offset + i for i in range(5)]
    try:
        deadline = time.monotonic() + 180
        for port in ports:
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if stack.poll() is not None:
                    tail = (local / "devstack.log").read_text(errors="replace")[-3000:]
                    raise SystemExit(f"the devstack exited with {stack.returncode}:\n{tail}")
                time.sleep(0.5)
            else:
                raise SystemExit(f"service on port {port} not ready within 180 s")
        print(f"platform ready; settling {args.settle:.0f} s, then measuring {args.seconds:.0f} s idle", flush=True)
        time.sleep(args.settle)
        postmaster = int((local / "pg" / "postmaster.pid").read_text().split()[0])
        roots = [stack.pid, postmaster]
        before = _per_process(descendants(roots))
        started = time.monotonic()
        time.sleep(args.seconds)
        after = _per_process(descendants(roots))
        elapsed = time.monotonic() - started
        used: dict[str, float] = {}
        for pid, (name, ticks) in after.items():
            delta = ticks - before.get(pid, (name, 0))[1]
            label = name.split(" -m ", 1)[-1] if " -m " in name else name
            used[label] = used.get(label, 0.0) + delta / TICKS
        for label, seconds in sorted(used.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {100 * seconds / elapsed:6.2f} %  {label}")
        total = 100 * sum(used.values()) / elapsed
        print(f"BENCH idle_cpu_percent {total:.2f} target=3 ratio={total / 3:.2f}")
    finally:
        stack.send_signal(signal.SIGTERM)
        try:
            stack.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
