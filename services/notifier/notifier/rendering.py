"""Templates rendered in Jinja2's sandbox; declared variables checked at save and at render."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from notifier.errors import RenderFailed, TemplateInvalid

# Names every render provides on top of the message's own variables.
IMPLICIT_VARIABLES = frozenset({"customer", "message_id", "unsubscribe_url"})
FIELDS = ("subject", "body", "html")
MAX_OUTPUT = 200_000
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@dataclass(slots=True)
class Rendered:
    subject: str | None
    body: str
    html: str | None


def _env(autoescape: bool) -> SandboxedEnvironment:
    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=autoescape, auto_reload=False, cache_size=0)


_TEXT = _env(False)
_HTML = _env(True)


def _parse(field: str, source: str) -> nodes.Template:
    env = _HTML if field == "html" else _TEXT
    try:
        return env.parse(source)
    except TemplateError as exc:
        raise TemplateInvalid(f"{field}: {exc}", details={"field": field, "error": str(exc)}) from None


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
        used = meta.find_undeclared_variables(_parse(field, source))
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
