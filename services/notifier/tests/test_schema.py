"""The models describe the tables the migrations create."""

from __future__ import annotations

from crm_common.testing.schema import schema_drift
from notifier.models import Base


async def test_models_match_the_migrated_schema(make_database):
    assert await schema_drift(await make_database("notifier"), Base.metadata) == []
