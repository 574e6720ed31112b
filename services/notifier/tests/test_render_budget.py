"""A render has a time budget: a runaway template fails alone, and the service keeps serving meanwhile."""

from __future__ import annotations

import asyncio
import itertools
import time
from types import SimpleNamespace
from typing import Any

import pytest

from notifier.errors import RenderFailed, RenderTimeout
from notifier.rendering import Renderer

from .conftest import add_template, seed_contact, wait_for_state

# 36 million iterations that print nothing: seconds of CPU, and no output limit to stop it earlier.
RUNAWAY = "{% for i in range(6000) %}{% for j in range(6000) %}{% endfor %}{% endfor %}done"
BUDGET_MS = 400


async def _probe_health(client: Any, until: Any) -> list[float]:
    """Ask /healthz every 10 ms until `until()`; the time between answers, the sleep included.

    A blocked event loop shows in the gaps (a request waiting for its turn), not only in the
    request's own duration.
    """
    answered = [time.perf_counter()]
    while not until():
        r = await client.get("/healthz")
        assert r.status_code == 200
        answered.append(time.perf_counter())
        await asyncio.sleep(0.01)
    return [b - a for a, b in itertools.pairwise(answered)]


def _template(body: str, **fields: Any) -> Any:
    values = {"id": f"t-{abs(hash(body))}", "version": 1, "subject": None, "html": None, "variables": []}
    return SimpleNamespace(body=body, **(values | fields))


def _render(body: str, variables: dict[str, Any] | None = None, budget_ms: float = 300) -> str:
    return Renderer().render(_template(body), variables or {}, {}, budget_ms=budget_ms).body


@pytest.mark.parametrize(
    "body",
    [
        RUNAWAY,
        # Recursion costs no loop at all: two calls per level, 2**40 calls.
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
        "{% for x in [1, 2] recursive %}{% if loop.depth < 60 %}{{ loop([1, 2]) }}{% endif %}{% endfor %}",
        "{% for x in range(100000) if x is odd %}{% for y in range(100000) %}{% endfor %}{% endfor %}",
    ],
    ids=["nested-loops", "recursive-macro", "recursive-loop", "filtered-loop"],
)
def test_a_runaway_render_stops_at_its_budget(body):
    started = time.perf_counter()
    with pytest.raises(RenderTimeout) as exc:
        _render(body, budget_ms=200)
    elapsed = time.perf_counter() - started
    assert exc.value.code == "render_timeout" and exc.value.reason == "render_timeout"
    assert 0.2 <= elapsed < 1.0, elapsed  # the slack is for a shared machine (and a GC pass)


def test_output_past_the_limit_fails_as_soon_as_it_is_produced_not_once_it_is_built():
    started = time.perf_counter()
    with pytest.raises(RenderFailed, match="more than 200000 characters") as exc:
        _render("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endfor %}")
    assert not isinstance(exc.value, RenderTimeout) and time.perf_counter() - started < 0.5
    # A macro doubling its output per level is stopped where it returns too much.
    with pytest.raises(RenderFailed, match="returned more than 200000 characters"):
        _render(
            "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}{{ 'x' * 100000 }}{% endif %}"
            "{% endmacro %}{{ f(30) }}"
        )


@pytest.mark.parametrize(
    "body",
    [
        "{{ '%0999999999d' % 1 }}",
        "{{ '%*d' % (999999999, 1) }}",
        "{{ '%0999999999d'|format(1) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ '{:>{w}}'.format(1, w=999999999) }}",
        "{{ 'x'.ljust(999999999) }}",
        "{{ 'x'.center(width=999999999) }}",
        "{{ 'x'|center(999999999) }}",
        "{{ 'a\nb'|indent(999999999) }}",
        "{{ ('x' * 100000).replace('', 'y' * 100000) }}",
        "{{ ('x' * 100000)|replace('x', 'y' * 100000) }}",
        "{{ range(100000)|join('x' * 100000) }}",
        "{{ ('x' * 100000).join(range(100000)) }}",
        "{{ ('\t' * 100000).expandtabs(100000) }}",
        "{{ [1]|slice(999999999)|list|length }}",
    ],
)
def test_one_operation_building_a_huge_string_is_refused_before_it_runs(body):
    # One C call cannot be stopped by the budget and holds the interpreter: each of these took seconds.
    started = time.perf_counter()
    with pytest.raises(RenderFailed) as exc:
        _render(body)
    assert not isinstance(exc.value, RenderTimeout) and time.perf_counter() - started < 0.5


def test_padding_formatting_replacing_and_joining_of_ordinary_sizes_still_work():
    body = (
        "{{ '%05d|%-4s|%.2f|%%' % (42, 'ab', 3.14159) }}"
        "|{{ '{:>5}|{:.3}'.format(name, 2.0) }}|{{ name.ljust(5) }}|{{ name.center(7, '*') }}|{{ '7'.zfill(3) }}"
        "|{{ name|center(7) }}|{{ 'a b'.replace(' ', '-') }}|{{ 'aaa'|replace('a', 'b', 2) }}"
        "|{{ items|join(', ') }}|{{ users|join('/', attribute='n') }}|{{ '-'.join(['x', 'y']) }}"
        "|{{ 'a\nb'|indent(2) }}|{{ '%s=%d'|format('n', 3) }}|{{ items|slice(2)|list }}|{{ 10 % 3 }}"
    )
    out = _render(body, {"name": "Ann", "items": [1, 2, 3], "users": [{"n": "a"}, {"n": "b"}]})
    assert out == (
        "00042|ab  |3.14|%|  Ann|2.0|Ann  |**Ann**|007|  Ann  |a-b|bba|1, 2, 3|a/b|x-y|a\n  b|n=3|[[1, 2], [3]]|1"
    )


def test_ordinary_loops_render_as_before_under_the_budget():
    body = (
        "{% for i in items %}{{ loop.index }}/{{ loop.length }}:{{ i }}{{ ',' if not loop.last }}"
        "{% else %}none{% endfor %}|{% for k, v in prices|dictsort %}{{ k }}={{ v }};{% endfor %}"
        "|{% for i in items if i > 1 %}{{ i }}{% endfor %}|{% for i in [] %}x{% else %}empty{% endfor %}"
        "|{% for n in tree recursive %}{{ n.name }}({{ loop(n.kids) }}){% endfor %}"
    )
    tree = [{"name": "a", "kids": [{"name": "b", "kids": []}]}, {"name": "c", "kids": []}]
    out = _render(body, {"items": [1, 2, 3], "prices": {"b": 2, "a": 1}, "tree": tree})
    assert out == "1/3:1,2/3:2,3/3:3|a=1;b=2;|23|empty|a(b())c()"
    # Without a budget (a caller that does not give one) nothing times out either.
    assert Renderer().render(_template("{{ x }}"), {"x": 1}, {}).body == "1"


async def test_a_runaway_template_fails_its_message_as_render_timeout_while_the_service_keeps_serving(
    start_app, provider
):
    async with start_app(render_timeout_ms=BUDGET_MS) as (client, app):
        await seed_contact(app, "slow-1", phone="+14155550101")
        await seed_contact(app, "fast-1", phone="+14155550102")
        await add_template(client, "runaway", "sms", body=RUNAWAY)
        await add_template(client, "hello", "sms", body="Hello")
        stop = asyncio.Event()
        prober = asyncio.create_task(_probe_health(client, stop.is_set))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        for mid, customer, template in (("rt-slow", "slow-1", "runaway"), ("rt-fast", "fast-1", "hello")):
            r = await client.post("/v1/messages", json={"id": mid, "customer_id": customer, "template": template})
            assert r.status_code == 202, r.text
        slow = await wait_for_state(client, "rt-slow", "failed", what="the runaway message failed")
        elapsed = time.perf_counter() - started
        fast = await wait_for_state(client, "rt-fast", "sent", what="the ordinary message sent")
        stop.set()
        gaps = await prober

        assert slow["reason"] == "render_timeout"
        assert [(e["status"], e["reason"]) for e in slow["events"]] == [("failed", "render_timeout")]
        assert slow["delivery_attempts"] == [] and slow["sent_at"] is None
        assert not [b for b in provider.bodies("/v1/sms") if b.get("reference") == "rt-slow"]
        assert fast["state"] == "sent"
        # The budget, plus a dispatcher pass and the state poll on a shared machine.
        assert BUDGET_MS / 1000 <= elapsed < BUDGET_MS / 1000 + 2.0, elapsed
        assert len(gaps) >= 20 and max(gaps) < 0.2, sorted(gaps)[-5:]
        # The render stopped at its budget: nothing keeps burning the CPU in a left-over thread.
        cpu = time.process_time()
        await asyncio.sleep(0.5)
        assert time.process_time() - cpu < 0.25


async def test_previewing_a_runaway_template_answers_422_render_timeout_without_blocking(start_app):
    async with start_app(render_timeout_ms=BUDGET_MS) as (client, _):
        template = await add_template(client, "runaway", "sms", body=RUNAWAY)
        started = time.perf_counter()
        preview = asyncio.create_task(client.post(f"/v1/templates/{template['id']}/preview", json={}))
        gaps = await _probe_health(client, preview.done)
        assert len(gaps) >= 10 and max(gaps) < 0.2, sorted(gaps)[-5:]
        r = await preview
        elapsed = time.perf_counter() - started
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "render_timeout"
        assert elapsed < BUDGET_MS / 1000 + 1.0, elapsed
        ok = await add_template(client, "hello", "sms", body="Hello {{ customer.first_name }}")
        r = await client.post(f"/v1/templates/{ok['id']}/preview", json={"first_name": "Ann"})
        assert r.status_code == 200 and r.json()["body"] == "Hello Ann"
