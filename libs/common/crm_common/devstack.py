"""The embedded default: `python -m crm_common.devstack run|stop`.

Starts PostgreSQL in `.local/pg` (port CRM_PG_PORT, default 55432), the Tansu broker (port
CRM_BROKER_PORT, default 19092) unless KAFKA_BOOTSTRAP_SERVERS is set, creates one database per
service (unless <SERVICE>_DATABASE_URL points elsewhere), the topics, runs migrations, creates the
bootstrap API key and starts the five services (and the local provider sinks) under a
`Supervisor`: one that exits is restarted with backoff, never the whole platform stopped. The
embedded broker is supervised too; after it restarted, a broker watch (crm_common.recovery)
detects whether it came back empty and, if so, restores the platform's messages. The other four services accept the same key
(CRM_API_KEYS is set to it unless already set), so one `Authorization: Bearer` header works
everywhere. Ctrl-C or `make stop` stops it cleanly: the pipeline is drained before the broker
goes away (group lag 0 for every consumer, every member assigned, outboxes empty; at most
CRM_DRAIN_TIMEOUT_S, default 60 s, and it says what it waits for).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from crm_common.infra import BrokerServer, PostgresServer, create_database, port_open
from crm_common.kafka import ensure_topics
from crm_common.migrations import upgrade
from crm_common.settings import ALL_TOPICS, SERVICE_PORTS
from crm_common.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[3]
LOCAL = Path(os.environ.get("CRM_LOCAL_DIR", ROOT / ".local")).resolve()
PID_FILE = LOCAL / "devstack.pid"
SERVICES = list(SERVICE_PORTS)
# CRM_PORT_OFFSET moves the five HTTP ports together (e.g. 10000 -> 18001..18005).
PORT_OFFSET = int(os.environ.get("CRM_PORT_OFFSET", "0"))
PORTS = {service: port + PORT_OFFSET for service, port in SERVICE_PORTS.items()}
# How long a stop waits for the pipeline to drain before it stops the broker anyway.
DRAIN_TIMEOUT_S = float(os.environ.get("CRM_DRAIN_TIMEOUT_S", "60"))


def _say(msg: str) -> None:
    print(f"[crm] {msg}", flush=True)


def _service_db_url(pg: PostgresServer, service: str) -> tuple[str, bool]:
    """The service's database URL and whether it is ours to create."""
    external = os.environ.get(f"{service.upper()}_DATABASE_URL")
    if external:
        return external, False
    return pg.url(service), True


def _ops_key(env: dict[str, str], bootstrap_key: str) -> str | None:
    """A plaintext key of CRM_API_KEYS to read the pipelines with (sha256: entries cannot be sent)."""
    entries = [e.strip() for e in env.get("CRM_API_KEYS", "").split(",") if e.strip()]
    if bootstrap_key in entries:
        return bootstrap_key
    return next((e for e in entries if not e.lower().startswith("sha256:")), None)


def pipeline_pending(service: str, doc: Mapping[str, Any]) -> list[str]:
    """What keeps one service's `/v1/ops/pipeline` answer from being drained; empty when drained.

    Drained means: the group lag of every consumer is 0 (unknown is not 0), every started member
    holds a settled assignment, no group is rebalancing or has partitions nobody holds, and the
    outbox is empty.
    """
    waits: list[str] = []
    backlog = doc.get("outbox_backlog")
    if not isinstance(backlog, int) or backlog < 0:
        waits.append(f"{service}: outbox backlog unknown")
    elif backlog:
        waits.append(f"{service}: outbox {backlog}")
    for c in doc.get("consumers", []):
        name = f"{service}/{c.get('name')}"
        lag = c.get("lag")
        group = c.get("group") or {}
        if not isinstance(lag, int):
            waits.append(f"{name}: lag unknown")
        elif lag:
            held = ""
            if "partitions" in group:
                held = f" (this member holds {c.get('partitions')} of {group['partitions']} partitions)"
            waits.append(f"{name}: lag {lag}{held}")
        if c.get("enabled", True) and not c.get("assigned"):
            waits.append(f"{name}: member not assigned")
        if group.get("rebalancing"):
            waits.append(f"{name}: group {group.get('state')} (rebalancing)")
        if group.get("unowned_partitions"):
            waits.append(f"{name}: {group['unowned_partitions']} partitions unowned")
    return waits


async def drain(
    ports: Mapping[str, int],
    api_key: str | None,
    *,
    timeout: float,
    alive: Callable[[str], bool] | None = None,
    say: Callable[[str], None] = _say,
    interval: float = 0.5,
    report_every: float = 2.0,
) -> bool:
    """Wait until every service's pipeline is drained (`pipeline_pending`) in two passes in a row,
    at most `timeout` s.

    Says what it waits for every `report_every` s, and what was left if it gives up. A service
    that does not answer is waited for, unless `alive(service)` says its process is gone.
    Returns whether the pipeline drained.
    """
    started = time.monotonic()
    deadline = started + timeout
    last_report = started
    clean = 0
    gone: set[str] = set()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=10, headers=headers) as client:
        while True:
            waits: list[str] = []
            for service, port in ports.items():
                if service in gone:
                    continue
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/v1/ops/pipeline")
                except httpx.HTTPError as exc:
                    if alive is not None and not alive(service):
                        gone.add(service)
                        say(f"{service} is not running: what it had not applied stays in the broker")
                    else:
                        waits.append(f"{service}: not answering ({type(exc).__name__})")
                    continue
                if r.status_code != 200:
                    waits.append(f"{service}: /v1/ops/pipeline answered {r.status_code}")
                    continue
                waits.extend(pipeline_pending(service, r.json()))
            now = time.monotonic()
            # Two clean passes in a row: a service read early in a pass may be sent a message by an
            # outbox read later in it (notifier's deliveries go back to segmentation).
            clean = clean + 1 if not waits else 0
            if clean >= 2:
                say(f"pipeline drained in {now - started:.1f} s")
                return True
            if waits and now >= deadline:
                say(f"pipeline not drained within {timeout:.0f} s; left: {'; '.join(waits)}")
                say("ingest replay can re-publish what is left")
                return False
            if waits and now - last_report >= report_every:
                say(f"draining, waiting for: {'; '.join(waits)}")
                last_report = now
            await asyncio.sleep(interval)


async def wait_ready(base_url: str, *, timeout: float, interval: float = 0.2) -> float | None:
    """Wait until `<base_url>/readyz` answers 200 (database and broker reachable); answers how long it took,
    or None when it did not within `timeout` s. A service that does not answer yet is waited for."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=3) as http:
        while True:
            try:
                if (await http.get(f"{base_url}/readyz")).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > timeout:
                return None
            await asyncio.sleep(interval)


def _sink_commands(env: dict[str, str]) -> dict[str, list[str]]:
    """Local provider sinks so messages really leave the notifier: an SMTP server writing a
    Maildir under .local/mail, and loopback SMS and push providers. Off with CRM_LOCAL_SINKS=0;
    skipped for any provider the environment already points elsewhere. Points the notifier's
    settings in `env` at them and answers their commands, by name, for the supervisor."""
    if os.environ.get("CRM_LOCAL_SINKS", "1") == "0":
        return {}
    commands: dict[str, list[str]] = {}
    if "NOTIFIER_SMTP_HOST" not in env and "NOTIFIER_SMTP_PORT" not in env:
        port = 1025 + PORT_OFFSET
        commands["smtp-sink"] = [
            sys.executable,
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            f"127.0.0.1:{port}",
            "-c",
            "aiosmtpd.handlers.Mailbox",
            str(LOCAL / "mail"),
        ]
        env["NOTIFIER_SMTP_HOST"], env["NOTIFIER_SMTP_PORT"] = "127.0.0.1", str(port)
        _say(f"local SMTP sink on 127.0.0.1:{port}: e-mails land in {LOCAL / 'mail' / 'new'}")
    for setting, port, path in (("NOTIFIER_SMS_URL", 8091, "/v1/sms"), ("NOTIFIER_PUSH_BASE_URL", 8092, "")):
        if setting in env:
            continue
        port += PORT_OFFSET
        name = "sms-sink" if "SMS" in setting else "push-sink"
        commands[name] = [sys.executable, "-m", "crm_common.sinks", "--port", str(port)]
        env[setting] = f"http://127.0.0.1:{port}{path}"
        _say(f"local {'SMS' if 'SMS' in setting else 'push'} provider sink on 127.0.0.1:{port}")
    return commands


def run() -> None:
    LOCAL.mkdir(parents=True, exist_ok=True)
    os.chmod(LOCAL, 0o755)
    pg = PostgresServer(LOCAL / "pg", int(os.environ.get("CRM_PG_PORT", "55432")))
    need_pg = any(not os.environ.get(f"{s.upper()}_DATABASE_URL") for s in SERVICES)
    if need_pg:
        _say(f"starting PostgreSQL on 127.0.0.1:{pg.port} (data in {pg.data_dir})")
        pg.start()
    broker: BrokerServer | None = None
    sup = Supervisor(say=_say, pid_dir=LOCAL / "pids")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = BrokerServer(int(os.environ.get("CRM_BROKER_PORT", "19092")), log_path=LOCAL / "broker.log")
        if port_open("127.0.0.1", broker.port):
            raise SystemExit(f"port {broker.port} is taken: is the platform already running? (`make stop`)")
        _say(f"starting the Kafka-protocol broker (Tansu) on 127.0.0.1:{broker.port}")
        # Supervised like the services: restarted on its port if it exits (empty: it keeps topics in
        # memory), and the broker watch below recovers what it lost.
        sup.add("broker", broker.command(), stdout=open(LOCAL / "broker.log", "ab"))
        broker.wait_listening()
        bootstrap = broker.bootstrap
    partitions = int(os.environ.get("KAFKA_TOPIC_PARTITIONS", "12"))
    prefix = os.environ.get("CRM_TOPIC_PREFIX", "")
    asyncio.run(ensure_topics(bootstrap, [prefix + t for t in ALL_TOPICS], partitions=partitions))
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    for service in SERVICES:
        url, ours = _service_db_url(pg, service)
        if ours:
            create_database(pg, service)
        upgrade(service, url)
        env[f"{service.upper()}_DATABASE_URL"] = url
    _say("migrations applied")
    # Offers reads segments, profiles and templates from its peers at decision time: wherever they listen.
    env.setdefault("OFFERS_SEGMENTATION_URL", f"http://127.0.0.1:{PORTS['segmentation']}")
    env.setdefault("OFFERS_NOTIFIER_URL", f"http://127.0.0.1:{PORTS['notifier']}")
    api_key = os.environ.get("CRM_BOOTSTRAP_API_KEY", "dev-pos-key")
    try:
        from ingest.keys import ensure_bootstrap_key  # type: ignore[import-not-found]

        asyncio.run(ensure_bootstrap_key(env["INGEST_DATABASE_URL"], api_key))
    except ImportError:
        _say("ingest has no key store yet; no bootstrap key created")
    if not env.get("CRM_API_KEYS", "").strip():
        env["CRM_API_KEYS"] = api_key
    ops_key = _ops_key(env, api_key)

    for name, argv in _sink_commands(env).items():
        sup.add(name, argv, env, stdout=subprocess.DEVNULL)
    for service, port in PORTS.items():
        sup.add(service, [sys.executable, "-m", "crm_common.serve", service, "--port", str(port)], env)
    # The ops console (crm_common.console): not one of the five services, so not in PORTS; supervised too.
    from crm_common.console.app import CONSOLE_PORT

    console_port = CONSOLE_PORT + PORT_OFFSET
    sup.add("console", [sys.executable, "-m", "crm_common.console", "--port", str(console_port)], env)
    PID_FILE.write_text(str(os.getpid()))
    stop = {"now": False}

    def _on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    deadline = time.monotonic() + 60
    for port in PORTS.values():
        while not port_open("127.0.0.1", port) and time.monotonic() < deadline and not stop["now"]:
            sup.step()
            time.sleep(0.1)
    _say("the platform is up:")
    for service, port in PORTS.items():
        _say(f"  {service:<13} http://127.0.0.1:{port}   docs: http://127.0.0.1:{port}/docs")
    _say(f"  console       http://127.0.0.1:{console_port}   (sign in with a key of CRM_API_KEYS)")
    _say(f"  PostgreSQL    127.0.0.1:{pg.port}   broker: {bootstrap}")
    _say(f"  bootstrap API key (source pos, all scopes): {api_key}")
    if ops_key == api_key:
        _say("  the same key opens the APIs of segmentation, loyalty, offers and notifier (CRM_API_KEYS)")
    else:
        _say("  the APIs of segmentation, loyalty, offers and notifier take a key of CRM_API_KEYS")
    _say(
        f"try:  curl -s -X POST http://127.0.0.1:{PORTS['ingest']}/v1/events -H 'Authorization: Bearer "
        + api_key
        + "' "
        "-H 'Content-Type: application/json' -d @docs/examples/purchase.json"
    )
    _say("a service that exits is restarted; Ctrl-C or `make stop` stops everything")
    watch = _start_broker_watch(sup, broker, env, api_key, ops_key, partitions, prefix) if broker else None
    try:
        # Only a signal ends this loop: an exited service, sink or broker is restarted (with backoff).
        while not stop["now"]:
            sup.step()
            time.sleep(0.2)
    finally:
        if watch is not None:
            watch()
        _say("stopping: draining the pipeline")
        try:
            asyncio.run(drain(PORTS, ops_key, timeout=DRAIN_TIMEOUT_S, alive=sup.alive))
        except Exception as exc:
            _say(f"drain failed: {exc!r}")
        sup.stop_all(timeout=35, names=[n for n in sup.children if n != "broker"])
        if broker:
            sup.stop_all(timeout=10, names=["broker"])
        if need_pg:
            pg.stop()
        PID_FILE.unlink(missing_ok=True)
        _say("stopped")


def _start_broker_watch(
    sup: Supervisor,
    broker: BrokerServer,
    env: Mapping[str, str],
    ingest_key: str,
    ops_key: str | None,
    partitions: int,
    prefix: str,
) -> Callable[[], None]:
    """Watch the embedded broker in a thread of its own (`crm_common.recovery.BrokerWatch`): after the
    supervisor restarted it, detect whether it came back empty and if so recover (topics, services
    restarted, ingest's replay, the outboxes republished). Answers the function that stops the watch."""
    import threading

    from crm_common.recovery import BrokerRecovery, BrokerWatch

    async def restart_services() -> None:
        # kill -9 (crash-safe by design): a graceful stop would commit positions of the lost logs.
        for service in SERVICES:
            sup.kill(service)
        await asyncio.sleep(1)
        deadline = time.monotonic() + 120
        for port in PORTS.values():
            await wait_ready(f"http://127.0.0.1:{port}", timeout=max(0.0, deadline - time.monotonic()), interval=0.5)

    recovery = BrokerRecovery(
        bootstrap=broker.bootstrap,
        topics=[prefix + t for t in ALL_TOPICS],
        partitions=partitions,
        ingest_url=f"http://127.0.0.1:{PORTS['ingest']}",
        ingest_key=ingest_key,
        outbox_urls={s: f"http://127.0.0.1:{p}" for s, p in PORTS.items() if s != "ingest"},
        ops_key=ops_key,
        restart_services=restart_services,
        say=lambda m: _say(f"broker watch: {m}"),
    )
    watch = BrokerWatch(recovery, pid=lambda: sup.pid("broker"), port=broker.port)
    loop = asyncio.new_event_loop()
    stopping = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(watch.run(stopping),), daemon=True)
    thread.start()

    def stop_watch() -> None:
        loop.call_soon_threadsafe(stopping.set)
        thread.join(10)

    return stop_watch


def stop() -> None:
    if not PID_FILE.exists():
        _say("not running")
        return
    pid = int(PID_FILE.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        PID_FILE.unlink(missing_ok=True)
        _say("not running")
        return
    # The drain, then up to 35 s for the services to stop, then the broker and PostgreSQL.
    deadline = time.monotonic() + DRAIN_TIMEOUT_S + 60
    while PID_FILE.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    _say("stopped" if not PID_FILE.exists() else "stop requested; still stopping")


def main() -> None:
    cmd = sys.argv[1] if len(sys.argv) > 1 else "run"
    if cmd == "run":
        run()
    elif cmd == "stop":
        stop()
    else:
        raise SystemExit(f"unknown command {cmd!r}: run or stop")


if __name__ == "__main__":
    main()
