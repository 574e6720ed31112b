"""crm_common.db: the runtime's tables in a service's metadata are the ones its first migration creates."""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

from crm_common.db import make_base, service_metadata
from crm_common.testing.schema import schema_drift


async def test_the_inbox_and_outbox_of_the_models_are_those_of_the_runtime_migration(make_database):
    # offers has only the runtime's migration (0001), so every difference would be in these two tables.
    url = await make_database("offers")
    assert await schema_drift(url, service_metadata()) == []
    assert await schema_drift(url, MetaData()) != []  # the comparison sees tables the models lack


def test_each_base_has_its_own_metadata_with_the_runtime_tables():
    class One(DeclarativeBase):
        metadata = service_metadata()

    other = make_base()
    assert One.metadata is not other.metadata
    for metadata in (One.metadata, other.metadata):
        assert set(metadata.tables) == {"inbox", "outbox"}
        assert metadata.naming_convention["pk"] == "pk_%(table_name)s"
