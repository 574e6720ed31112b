"""Local provider sinks: where the notifier's messages land on the embedded stack, in tests and benches.

The devstack starts them (`devstack._start_sinks`): e-mail goes to an SMTP server (aiosmtpd) writing
a Maildir, SMS and push to `LoopbackProvider`, a scriptable HTTP provider on loopback (SMS API,
FCM-shaped push). It is a real HTTP/1.1 server (asyncio, keep-alive) running in its own thread, or
its own process with `python -m crm_common.sinks --port N`. A test scripts it: `script([500, 500])`
answers 500 twice then the default 200; `down()` closes the port (connection refused) until `up()`.
Nothing here is imported by a service: the notifier's package ships no test provider.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)
    # time.perf_counter() when the request was read (benchmarks time end-to-end latency with it)
    at: float = field(default_factory=time.perf_counter)


class LoopbackProvider:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record: bool = True) -> None:
        self.host = host
        self.port = port
        self.record = record
        self.received: list[Received] = []
        self.count = 0
        self.default_status = 200
        self.delay_s = 0.0
        self._script: collections.deque[int] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- scripting (any thread) ------------------------------------------------------------------

    def script(self, statuses: list[int]) -> None:
        """Answer these statuses first, in order, then the default."""
        self._script.extend(statuses)

    def down(self) -> None:
        """Close the port and every open connection: callers get connection refused."""
        self._call(self._close())

    def up(self) -> None:
        self._call(self._open())

    def bodies(self, path_contains: str = "") -> list[dict[str, Any]]:
        return [r.body for r in list(self.received) if path_contains in r.path]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> LoopbackProvider:
        self._thread = threading.Thread(target=self._thread_main, name="loopback-provider", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def _thread_main(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._open())
        self._ready.set()
        self._loop.run_forever()
        # Answers still in progress (a scripted delay) are cancelled here, not destroyed pending.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _open(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, reuse_address=True, backlog=1024
            )
            self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    # -- HTTP ------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(length) if length else b""
                status = self._script.popleft() if self._script else self.default_status
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self.count += 1
                n = self.count
                if self.record:
                    try:
                        body = orjson.loads(raw) if raw else {}
                    except orjson.JSONDecodeError:
                        body = {"_raw": raw.decode(errors="replace")}
                    if status < 300:
                        self.received.append(Received(method, path, headers, body))
                payload = (
                    orjson.dumps(
                        {
                            "id": f"p-{n}",
                            "name": f"projects/fake/messages/{n}",
                            "status": "accepted",
                        }
                    )
                    if status < 300
                    else orjson.dumps({"error": {"code": status, "status": "SCRIPTED"}})
                )
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (status, len(payload), payload)
                )
                await writer.drain()
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            ValueError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a loopback SMS/push provider")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    provider = LoopbackProvider(port=args.port, record=args.record)

    async def run() -> None:
        await provider._open()
        await asyncio.Event().wait()

    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


if __name__ == "__main__":
    main()
