"""Templates rendered in Jinja2's sandbox; declared variables checked at save and at render."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from notifier.errors import RenderFailed, TemplateInvalid

# Names every render provides on top of the message's own variables.
IMPLICIT_VARIABLES = frozenset({"customer", "message_id", "unsubscribe_url"})
FIELDS = ("subject", "body", "html")
MAX_OUTPUT = 200_000
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# The largest integer `**` or `*` may produce, in bits (about 30,000 decimal digits).
MAX_INT_BITS = 100_000


@dataclass(slots=True)
class Rendered:
    subject: str | None
    body: str
    html: str | None


class _BoundedSandbox(SandboxedEnvironment):
    """The sandbox with `*` and `**` bounded.

    Unintercepted, Jinja folds constant expressions while compiling, so saving `{{ 'x' * 10**10 }}`
    or `{{ 9**9**9 }}` would allocate gigabytes or compute for hours inside the request; at render
    `{{ name * 10**9 }}` would build the whole string before the output limit is checked.
    Intercepted operators are never folded and go through `call_binop`, which refuses oversized
    results before computing them.
    """

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                    raise SecurityError(f"the result of '*' would exceed {MAX_OUTPUT} items")
            if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise SecurityError("the result of '*' would be too large a number")
        elif operator == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            if right * left.bit_length() > MAX_INT_BITS:
                raise SecurityError("the result of '**' would be too large a number")
        return super().call_binop(context, operator, left, right)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _env(autoescape: bool) -> SandboxedEnvironment:
    return _BoundedSandbox(undefined=StrictUndefined, autoescape=autoescape, auto_reload=False, cache_size=0)


_TEXT = _env(False)
_HTML = _env(True)


def _invalid(field: str, error: str) -> TemplateInvalid:
    return TemplateInvalid(f"{field}: {error}", details={"field": field, "error": error})


def _used_names(field: str, source: str) -> set[str]:
    """Parse and compile one part; the names it reads from the context. TemplateInvalid if it cannot be."""
    env = _HTML if field == "html" else _TEXT
    try:
        ast = env.parse(source)
        # Compiling (inside find_undeclared_variables) is what finds unknown filters.
        used = meta.find_undeclared_variables(ast)
    except TemplateError as exc:
        raise _invalid(field, getattr(exc, "message", None) or str(exc)) from None
    except RecursionError:
        raise _invalid(field, "the template is nested too deeply") from None
    unknown_tests = sorted({t.name for t in ast.find_all(nodes.Test) if t.name not in env.tests})
    if unknown_tests:
        # Jinja only finds these when the test runs; refuse them at save like unknown filters.
        raise _invalid(field, f"no test named {', '.join(map(repr, unknown_tests))}")
    return used


def check_template(*, channel: str, subject: str | None, body: str, html: str | None, variables: list[str]) -> None:
    """Refuse a template that does not parse or uses a variable it does not declare."""
    bad = [v for v in variables if not _IDENT.match(v)]
    if bad:
        raise TemplateInvalid("variable names must be identifiers", details={"field": "variables", "invalid": bad})
    if channel == "email" and not subject:
        raise TemplateInvalid("an e-mail template needs a subject", details={"field": "subject"})
    if channel != "email" and html:
        raise TemplateInvalid("only e-mail templates have an html part", details={"field": "html"})
    declared = set(variables) | IMPLICIT_VARIABLES
    for field, source in (("subject", subject), ("body", body), ("html", html)):
        if source is None:
            continue
        used = _used_names(field, source)
        undeclared = sorted(used - declared)
        if undeclared:
            raise TemplateInvalid(
                f"{field} uses undeclared variables: {', '.join(undeclared)}",
                details={"field": field, "undeclared": undeclared, "declared": sorted(variables)},
            )


class Renderer:
    """Compile templates once per version and render them with strict, sandboxed semantics."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], dict[str, Any]] = {}

    def _compiled(self, template: Any) -> dict[str, Any]:
        key = (template.id, template.version)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = {}
            for field in FIELDS:
                source = getattr(template, field)
                if source is not None:
                    env = _HTML if field == "html" else _TEXT
                    compiled[field] = env.from_string(source)
            if len(self._cache) > 2000:
                self._cache.clear()
            self._cache[key] = compiled
        return compiled

    def render(self, template: Any, variables: dict[str, Any], implicit: dict[str, Any]) -> Rendered:
        """Render every part; a declared variable missing from `variables` fails the render."""
        missing = sorted(v for v in template.variables if v not in variables and v not in implicit)
        if missing:
            raise RenderFailed(f"missing variables: {', '.join(missing)}", details={"missing": missing})
        context = {**variables, **implicit}
        out: dict[str, str | None] = {"subject": None, "body": "", "html": None}
        try:
            for field, compiled in self._compiled(template).items():
                text = compiled.render(context)
                if len(text) > MAX_OUTPUT:
                    raise RenderFailed(f"{field} renders to more than {MAX_OUTPUT} characters")
                out[field] = text
        except RenderFailed:
            raise
        except TemplateError as exc:
            raise RenderFailed(f"render failed: {exc}", details={"error": str(exc)}) from None
        except Exception as exc:  # anything a hostile template can provoke inside the sandbox
            raise RenderFailed(f"render failed: {type(exc).__name__}", details={"error": str(exc)[:500]}) from None
        subject = out["subject"]
        if subject is not None:
            # A header never carries a line break, whatever the variables contain.
            subject = " ".join(subject.split())
        return Rendered(subject=subject, body=out["body"] or "", html=out["html"])
