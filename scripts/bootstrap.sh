#!/usr/bin/env bash
# Make this checkout runnable on a fresh machine: PostgreSQL server binaries, a virtual
# environment with uv, and the locked Python packages. Safe to run again; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_PYTHON_DOWNLOADS=never

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "bootstrap: Python 3.11 or newer is required (set PYTHON=...)" >&2
  exit 1
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1 && [ -z "${CRM_PG_BIN:-}" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing the PostgreSQL server from Debian packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  else
    echo "bootstrap: PostgreSQL server binaries not found; install 'postgresql' or set CRM_PG_BIN" >&2
    exit 1
  fi
fi

# Headless Chromium for the console's browser tests (tests/test_console.py), driven by Playwright
# with this binary: Playwright's own browser downloads are never used.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing Chromium from Debian packages (the console's browser tests)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "bootstrap: chromium not found; install Debian's 'chromium' to run tests/test_console.py" >&2
  fi
fi

if [ ! -x .venv/bin/uv ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q uv==0.13.8
fi
stamp=.venv/.synced
if [ ! -f "$stamp" ] || [ uv.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/uv sync --frozen --all-packages --python .venv/bin/python -q
  touch "$stamp"
fi
