"""Tables owned by the ingest service."""

from __future__ import annotations

from crm_common.db import make_base

Base = make_base()
