"""Schemathesis over a running service's OpenAPI: every operation, valid and invalid inputs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from crm_common.testing.helpers import TEST_AUTH


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
