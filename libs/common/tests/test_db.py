"""crm_common.db: the runtime's tables in a service's metadata are the ones its first migration creates."""

from __future__ import annotations

from typing import Any

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

from crm_common.db import make_base, service_metadata
from crm_common.testing.schema import schema_drift


def _table_of(diff: Any) -> str | None:
    """The table an autogenerate difference is about (tables, indexes, columns, modifications)."""
    if isinstance(diff, list):
        return _table_of(diff[0]) if diff else None
    kind, *rest = diff
    if kind in ("add_table", "remove_table"):
        return str(rest[0].name)
    if kind in ("add_index", "remove_index", "add_constraint", "remove_constraint"):
        return str(rest[0].table.name)
    if kind in ("add_column", "remove_column") or kind.startswith("modify_"):
        return str(rest[1])
    return None


async def test_the_inbox_and_outbox_of_the_models_are_those_of_the_runtime_migration(make_database):
    # Only the runtime tables' differences count: the service's own tables are not in this metadata.
    url = await make_database("offers")
    runtime = {"inbox", "outbox"}
    assert [d for d in await schema_drift(url, service_metadata()) if _table_of(d) in runtime] == []
    # The comparison does see the runtime tables when the models lack them.
    assert {_table_of(d) for d in await schema_drift(url, MetaData())} >= runtime


def test_each_base_has_its_own_metadata_with_the_runtime_tables():
    class One(DeclarativeBase):
        metadata = service_metadata()

    other = make_base()
    assert One.metadata is not other.metadata
    for metadata in (One.metadata, other.metadata):
        assert set(metadata.tables) == {"inbox", "outbox"}
        assert metadata.naming_convention["pk"] == "pk_%(table_name)s"
