"""Run the console with uvicorn: `python -m crm_common.console [--port N]` (default 8000 + CRM_PORT_OFFSET)."""

from __future__ import annotations

import argparse

import uvicorn

from crm_common.console.app import CONSOLE_PORT, ConsoleSettings, create_app
from crm_common.serve import KEEP_ALIVE_S, QuietServer


def main() -> None:
    settings = ConsoleSettings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=CONSOLE_PORT + settings.port_offset)
    args = parser.parse_args()
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        access_log=False,
        log_config=None,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    QuietServer(config).run()


if __name__ == "__main__":
    main()
