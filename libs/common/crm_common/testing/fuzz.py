"""Schemathesis over a running service's OpenAPI: every operation, valid and invalid inputs."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from crm_common.infra import free_port
from crm_common.testing.helpers import TEST_AUTH, ServiceProcess


def fuzz_openapi(
    base_url: str,
    *,
    max_examples: int = 15,
    headers: dict[str, str] | None = None,
    skip_prefixes: Sequence[str] = ("POST /v1/ops/sweeps",),
) -> tuple[Counter[tuple[str, int]], list[str]]:
    """Call every operation with generated inputs; return (label, status) counts and the 5xx found.

    `headers` go with every call; by default the test harness's API key, so the fuzzing reaches
    past the authentication of the routes instead of collecting 401s.
    """
    if headers is None:
        headers = TEST_AUTH
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()

    def caller(label: str) -> Callable[[Any], None]:
        def call(case: Any) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=30)
            seen[(label, response.status_code)] += 1
            if response.status_code >= 500:
                failures.append(f"{label} -> {response.status_code}: {response.text[:200]}")

        return call

    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an invalid schema should fail the test loudly
        if any(operation.label.startswith(p) for p in skip_prefixes):
            continue  # e.g. sweeps do real work; they have tests of their own
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = settings(
                max_examples=max_examples,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )(given(case=operation.as_strategy(generation_mode=mode))(caller(operation.label)))
            try:
                run()
            except Unsatisfiable:
                # Nothing invalid can be generated for an operation without inputs.
                if mode is not GenerationMode.NEGATIVE:
                    raise
    return seen, failures


@dataclass
class FuzzReport:
    """What a fuzzing run saw: calls counted by (operation label, status), and the 5xx answers."""

    seen: Counter[tuple[str, int]]
    failures: list[str]

    def calls(self, label: str | None = None) -> int:
        """Calls made, of one operation (`"POST /v1/templates"`) or of all."""
        return sum(n for (op, _), n in self.seen.items() if label is None or op == label)

    def assert_sound(self, *, min_calls: int, signed: Collection[str] = ()) -> None:
        """No 5xx, at least `min_calls` calls, and each operation but the `signed` ones past the key.

        The fuzzer sends the test key (negative cases may drop it), so an operation that only ever
        answered 401 was never really exercised; `signed` operations authenticate their caller
        otherwise (an HMAC signature) and may refuse every generated call.
        """
        assert self.failures == []
        assert self.calls() >= min_calls, self.seen
        past_key = {op for (op, status) in self.seen if status != 401}
        assert {op for (op, _) in self.seen} - past_key <= set(signed), self.seen


async def fuzz_service(
    service: str,
    *,
    database_url: str,
    env: Mapping[str, str],
    max_examples: int = 15,
    headers: dict[str, str] | None = None,
    skip_prefixes: Sequence[str] = ("POST /v1/ops/sweeps",),
) -> FuzzReport:
    """Start `service` in its own process on `database_url` and fuzz its OpenAPI (see `fuzz_openapi`)."""
    proc = ServiceProcess(service, free_port(), {**env, f"{service.upper()}_DATABASE_URL": database_url})
    await asyncio.to_thread(proc.start)
    try:
        seen, failures = await asyncio.to_thread(
            fuzz_openapi, proc.url, max_examples=max_examples, headers=headers, skip_prefixes=skip_prefixes
        )
    finally:
        await asyncio.to_thread(proc.stop)
    return FuzzReport(seen, failures)
