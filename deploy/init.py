"""One-shot deployment job: create the Kafka topics, migrate every service database, seed ingest's key.

Run once per release before the services roll out (docker-compose service `init`, Kubernetes Job
`crm-migrate`). It reads the same environment variables as the services themselves, through each
service's own Settings class, so the job and the services cannot disagree on where things are:
`<SVC>_DATABASE_URL`, `KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_TOPIC_PARTITIONS`, `CRM_TOPIC_PREFIX`, plus
`CRM_BOOTSTRAP_API_KEY` (optional) for the first ingest API key. Every step is idempotent.

    python deploy/init.py                      # topics + all migrations + bootstrap key
    python deploy/init.py --skip-topics        # on Kubernetes, where Strimzi KafkaTopics own the topics
    python deploy/init.py --services ingest    # a subset
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import inspect
import logging
import time
from collections.abc import Callable

from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.exc import InterfaceError, OperationalError

from crm_common.kafka import ensure_topics
from crm_common.migrations import upgrade
from crm_common.settings import ALL_TOPICS, SERVICE_PORTS, BaseServiceSettings

log = logging.getLogger("crm.init")

# Connection failures worth waiting out: the database may still be starting (CloudNativePG
# bootstrapping, compose healthcheck racing the first connection).
TRANSIENT = (OSError, OperationalError, InterfaceError)


class InitSettings(BaseSettings):
    """Settings of the job itself (environment variables prefixed CRM_)."""

    model_config = SettingsConfigDict(env_prefix="CRM_", extra="ignore")

    bootstrap_api_key: str = ""
    init_wait_s: float = 120.0


def service_settings(service: str) -> BaseServiceSettings:
    """Load a service's Settings from the environment exactly as the service process would."""
    settings_cls = importlib.import_module(f"{service}.settings").Settings
    return settings_cls()  # type: ignore[no-any-return]


def retrying(what: str, fn: Callable[[], object], *, wait_s: float) -> object:
    """Call `fn` until it succeeds or `wait_s` has passed, retrying only on connection failures."""
    deadline = time.monotonic() + wait_s
    delay = 0.5
    while True:
        try:
            return fn()
        except TRANSIENT as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s; retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def create_topics(settings: BaseServiceSettings) -> None:
    """Create every platform topic that is missing, with the configured partition count."""
    topics = [settings.topic_prefix + t for t in ALL_TOPICS]
    asyncio.run(ensure_topics(settings.kafka_bootstrap_servers, topics, partitions=settings.kafka_topic_partitions))
    log.info("topics ready: %s (%d partitions)", ", ".join(topics), settings.kafka_topic_partitions)


def seed_bootstrap_key(database_url: str, key: str) -> bool:
    """Store ingest's first API key if ingest provides the hook; False when it does not (yet)."""
    try:
        from ingest.keys import ensure_bootstrap_key  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        log.warning("ingest.keys.ensure_bootstrap_key is not available; bootstrap API key not seeded")
        return False
    result = ensure_bootstrap_key(database_url, key)
    if inspect.isawaitable(result):
        asyncio.run(result)  # type: ignore[arg-type]
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Create topics, run migrations, seed the first API key.")
    parser.add_argument("--skip-topics", action="store_true", help="topics are managed elsewhere (Strimzi)")
    parser.add_argument("--services", default=",".join(SERVICE_PORTS), help="comma-separated services to migrate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    job = InitSettings()
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    unknown = sorted(set(services) - set(SERVICE_PORTS))
    if unknown:
        parser.error(f"unknown services: {', '.join(unknown)}")

    if not args.skip_topics:
        create_topics(service_settings("ingest"))
    for service in services:
        url = service_settings(service).database_url
        retrying(f"migrate {service}", functools.partial(upgrade, service, url), wait_s=job.init_wait_s)
        log.info("migrated %s", service)
    if job.bootstrap_api_key and "ingest" in services:
        if seed_bootstrap_key(service_settings("ingest").database_url, job.bootstrap_api_key):
            log.info("bootstrap API key ensured")


if __name__ == "__main__":
    main()
