"""`make run` end to end: the embedded stack starts, a purchase posted to ingest reaches crm.events.v1,
the bootstrap key also opens the other services' APIs, a service killed with -9 is restarted by the
supervisor and the platform goes on accepting and applying events, and a clean stop brings
everything down."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from crm_common.infra import free_port, port_open
from crm_common.settings import SERVICE_PORTS
from crm_common.testing.helpers import eventually, read_topic


def _free_offset() -> int:
    for offset in range(20000, 40000, 100):
        if not any(port_open("127.0.0.1", p + offset) for p in SERVICE_PORTS.values()):
            return offset
    raise RuntimeError("no free port range")


async def test_make_run_accepts_a_purchase_and_publishes_it():
    local = Path(tempfile.mkdtemp(prefix="crm-devstack-"))
    os.chmod(local, 0o755)
    offset = _free_offset()
    broker_port = free_port()
    env = {
        **os.environ,
        "CRM_LOCAL_DIR": str(local),
        "CRM_PG_PORT": str(free_port()),
        "CRM_BROKER_PORT": str(broker_port),
        "CRM_PORT_OFFSET": str(offset),
        "CRM_BOOTSTRAP_API_KEY": "devstack-test-key",
        "KAFKA_TOPIC_PARTITIONS": "3",
    }
    # Without CRM_API_KEYS the stack makes the bootstrap key the ops key of the other services.
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "CRM_TOPIC_PREFIX", "CRM_API_KEYS"):
        env.pop(name, None)
    # A file, not a pipe: the services log to the devstack's stdout, and a full pipe would block them.
    log_path = local / "devstack.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "crm_common.devstack", "run"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ingest = f"http://127.0.0.1:{SERVICE_PORTS['ingest'] + offset}"
    try:
        async with httpx.AsyncClient(timeout=10) as client:

            async def all_up() -> bool:
                for port in SERVICE_PORTS.values():
                    try:
                        r = await client.get(f"http://127.0.0.1:{port + offset}/readyz")
                    except httpx.HTTPError:
                        return False
                    if r.status_code != 200:
                        return False
                return True

            await eventually(all_up, timeout=120, interval=0.5, what="all five services ready")
            body = Path(__file__).resolve().parents[1].joinpath("docs/examples/purchase.json").read_bytes()
            r = await client.post(
                f"{ingest}/v1/events",
                content=body,
                headers={"Authorization": "Bearer devstack-test-key", "Content-Type": "application/json"},
            )
            assert r.status_code == 202, r.text
            assert r.json()["accepted"] == 1
            # The same header opens loyalty's API; without it, 401.
            programme = f"http://127.0.0.1:{SERVICE_PORTS['loyalty'] + offset}/v1/programme"
            assert (await client.get(programme)).status_code == 401
            r = await client.get(programme, headers={"Authorization": "Bearer devstack-test-key"})
            assert r.status_code == 200, r.text
            # The console is up beside them, and its proxy forwards the same key.
            console = f"http://127.0.0.1:{8000 + offset}"
            await eventually(lambda: port_open("127.0.0.1", 8000 + offset), timeout=30, what="the console")
            assert "console.js" in (await client.get(f"{console}/")).text
            r = await client.get(
                f"{console}/api/loyalty/v1/programme", headers={"Authorization": "Bearer devstack-test-key"}
            )
            assert (
                r.status_code == 200
                and r.json()
                == (await client.get(programme, headers={"Authorization": "Bearer devstack-test-key"})).json()
            )
        import orjson

        event_id = orjson.loads(body)["event_id"]
        msgs = await read_topic(f"127.0.0.1:{broker_port}", "crm.events.v1", min_count=1, timeout=20)
        assert [m["event_id"] for m in msgs] == [event_id]
        assert msgs[0]["type"] == "purchase" and msgs[0]["source"] == "pos"
        await _kill_9_is_restarted_and_the_platform_goes_on(local, offset, broker_port, body, log_path)
        await _a_broker_killed_comes_back_empty_and_is_recovered(local, offset, broker_port, body, log_path)
    finally:
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            await asyncio.to_thread(proc.wait, timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stopped_in = time.monotonic() - started
        log.close()
    text = log_path.read_text(errors="replace")
    assert "[crm] stopped" in text, text[-3000:]
    assert stopped_in < 90
    assert not port_open("127.0.0.1", SERVICE_PORTS["ingest"] + offset)
    assert not port_open("127.0.0.1", 8000 + offset)
    assert not port_open("127.0.0.1", broker_port)


async def _kill_9_is_restarted_and_the_platform_goes_on(
    local: Path, offset: int, broker_port: int, body: bytes, log_path: Path
) -> None:
    """kill -9 loyalty: the supervisor starts it again (a new pid, /readyz 200, the restart logged),
    and a second purchase posted after it is published and accrued by the restarted loyalty."""
    import orjson

    pid_file = local / "pids" / "loyalty.pid"
    old = int(pid_file.read_text())
    os.killpg(old, signal.SIGKILL)
    loyalty = f"http://127.0.0.1:{SERVICE_PORTS['loyalty'] + offset}"
    auth = {"Authorization": "Bearer devstack-test-key"}
    async with httpx.AsyncClient(timeout=10) as client:

        async def restarted() -> bool:
            if not pid_file.exists() or int(pid_file.read_text()) == old:
                return False
            try:
                return (await client.get(f"{loyalty}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(restarted, timeout=60, interval=0.3, what="loyalty restarted and ready")
        assert "loyalty exited with -9 (SIGKILL); restart #1 in 0.5 s" in log_path.read_text(errors="replace")
        event = orjson.loads(body)
        event["event_id"] += "-after-kill"
        event["properties"]["order_id"] += "-after-kill"
        r = await client.post(
            f"http://127.0.0.1:{SERVICE_PORTS['ingest'] + offset}/v1/events", json=event, headers=auth
        )
        assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
        msgs = await read_topic(f"127.0.0.1:{broker_port}", "crm.events.v1", min_count=2, timeout=20)
        assert event["event_id"] in [m["event_id"] for m in msgs]

        async def both_accrued() -> bool:
            r = await client.get(f"{loyalty}/v1/accounts/{event['customer_id']}", headers=auth)
            return r.status_code == 200 and r.json()["purchases_count"] == 2

        await eventually(both_accrued, timeout=60, interval=0.5, what="the restarted loyalty accrued the purchase")


async def _a_broker_killed_comes_back_empty_and_is_recovered(
    local: Path, offset: int, broker_port: int, body: bytes, log_path: Path
) -> None:
    """kill -9 the broker: the supervisor starts it again, empty, on its port; the broker watch detects
    the loss, recreates the topics and has ingest replay its archive (both events are on crm.events.v1
    again), and loyalty, which had applied both, applies nothing twice."""
    import orjson

    pid_file = local / "pids" / "broker.pid"
    old = int(pid_file.read_text())
    os.killpg(old, signal.SIGKILL)
    await eventually(
        lambda: "broker watch: recovered:" in log_path.read_text(errors="replace"),
        timeout=180,
        interval=0.5,
        what="the broker watch's recovery",
    )
    text = log_path.read_text(errors="replace")
    assert "broker watch: broker lost its data (topics missing" in text or "partitions end below" in text, text[-3000:]
    assert int(pid_file.read_text()) != old
    event_id = orjson.loads(body)["event_id"]
    msgs = await read_topic(f"127.0.0.1:{broker_port}", "crm.events.v1", min_count=2, timeout=30)
    assert {event_id, event_id + "-after-kill"} <= {m["event_id"] for m in msgs}
    loyalty = f"http://127.0.0.1:{SERVICE_PORTS['loyalty'] + offset}"
    auth = {"Authorization": "Bearer devstack-test-key"}
    customer = orjson.loads(body)["customer_id"]
    async with httpx.AsyncClient(timeout=10) as client:

        async def pipeline_settled() -> bool:
            r = await client.get(f"{loyalty}/v1/ops/pipeline", headers=auth)
            return r.status_code == 200 and all(c["lag"] == 0 and c["assigned"] for c in r.json()["consumers"])

        await eventually(pipeline_settled, timeout=90, interval=0.5, what="loyalty caught up on the new broker")
        r = await client.get(f"{loyalty}/v1/accounts/{customer}", headers=auth)
        assert r.status_code == 200 and r.json()["purchases_count"] == 2, r.text
