"""Run one service with uvicorn: `python -m crm_common.serve <service> [--port N]`."""

from __future__ import annotations

import argparse
import os

import uvicorn

from crm_common.settings import SERVICE_PORTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("service", choices=sorted(SERVICE_PORTS))
    parser.add_argument("--host", default=os.environ.get("CRM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    port = args.port or SERVICE_PORTS[args.service]
    uvicorn.run(
        f"{args.service}.app:create_app",
        factory=True,
        host=args.host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
