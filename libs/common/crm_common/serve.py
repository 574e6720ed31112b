"""Run one service with uvicorn: `python -m crm_common.serve <service> [--port N]`."""

from __future__ import annotations

import argparse
import asyncio
import os

import uvicorn

from crm_common.settings import SERVICE_PORTS

# How long an idle keep-alive connection stays open. uvicorn's default (5 s) equals the
# Retry-After of a 503, so a client that waits it out and reuses its connection meets the
# server closing it at that very moment (ECONNRESET); nginx's default is 75 s.
KEEP_ALIVE_S = 75


class QuietServer(uvicorn.Server):
    """uvicorn's server, ticking once a second instead of ten times.

    The tick refreshes the Date header (once a second either way) and notices a requested exit;
    ten wake-ups a second are most of what an idle service process costs, for nothing.
    """

    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            # on_tick does its once-a-second work when the counter is a multiple of 10.
            counter = (counter + 10) % 864000
            await asyncio.sleep(1.0)
            should_exit = await self.on_tick(counter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("service", choices=sorted(SERVICE_PORTS))
    parser.add_argument("--host", default=os.environ.get("CRM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    port = args.port or SERVICE_PORTS[args.service]
    config = uvicorn.Config(
        f"{args.service}.app:create_app",
        factory=True,
        host=args.host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    QuietServer(config).run()


if __name__ == "__main__":
    main()
