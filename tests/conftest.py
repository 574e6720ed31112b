"""Fixtures of the cross-service tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest_asyncio

from crm_common.testing.helpers import stack_settings


@pytest_asyncio.fixture(loop_scope="session")
async def app_settings(broker, make_database, topic_prefix) -> Callable[..., Awaitable[Any]]:
    """Settings of a service on the test stack, in a fresh migrated database, with no consumers
    or sweeps running: `await app_settings(LoyaltySettings, max_request_bytes=...)`."""

    async def _make(settings_cls: type, **overrides: Any) -> Any:
        url = await make_database(settings_cls().service_name)
        return stack_settings(
            settings_cls, database_url=url, bootstrap=broker.bootstrap, topic_prefix=topic_prefix, **overrides
        )

    return _make
