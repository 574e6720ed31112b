"""Templates rendered in Jinja2's sandbox; declared variables checked at save and at render.

A render has a time budget. Python cannot stop a thread from outside, so the sandbox stops the
render itself: every loop iteration and every call (functions, methods, macros, recursive loops)
checks the render's deadline and raises RenderTimeout once it is past. Renders run on a small
thread pool (`Renderer.offload`), so a slow one holds neither the event loop nor, once its budget
is spent, the CPU.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from string import Formatter
from typing import Any, ParamSpec, TypeVar

from jinja2 import StrictUndefined, TemplateError, meta, nodes, pass_context, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import SandboxedEnvironment

from crm_common.errors import InvalidInput
from notifier.errors import RenderFailed, RenderTimeout, TemplateInvalid

# Names every render provides on top of the message's own variables.
IMPLICIT_VARIABLES = frozenset({"customer", "message_id", "unsubscribe_url"})
FIELDS = ("subject", "body", "html")
MAX_OUTPUT = 200_000
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# The largest integer `**` or `*` may produce, in bits (about 30,000 decimal digits).
MAX_INT_BITS = 100_000
# A filter name no template can spell (the lexer has no ':' in names): the loop-budget hook.
_LOOP_HOOK = "budget:loop"
# More than the dispatcher's workers (2), so a preview does not queue behind two slow batches.
RENDER_THREADS = 4

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

# The deadline (time.perf_counter) of the render running on this thread; inf outside a budget.
_budget = threading.local()


def _deadline() -> float:
    return getattr(_budget, "deadline", math.inf)


def _over_budget() -> RenderTimeout:
    return RenderTimeout("the template ran past its render time budget")


def _budgeted(iterable: Iterable[Any]) -> Iterator[Any]:
    """Iterate `iterable`, raising RenderTimeout at the first item past the render's deadline."""
    deadline = _deadline()
    clock = time.perf_counter
    for item in iterable:
        if clock() > deadline:
            raise _over_budget()
        yield item


@pass_context  # a context filter is never folded at compile time, so each loop gets its own iterator
def _loop_hook(_context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    return _budgeted(iterable)


class _BudgetedCodeGenerator(CodeGenerator):
    """Compile every `{% for %}` to iterate through the budget check."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in list(node.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, _LOOP_HOOK, [], [], None, None, lineno=loop.iter.lineno)
        super().visit_Template(node, frame)


@dataclass(slots=True)
class Rendered:
    subject: str | None
    body: str
    html: str | None


class _BoundedSandbox(SandboxedEnvironment):
    """The sandbox with `*` and `**` bounded, and loops and calls checking the render's deadline.

    Unintercepted, Jinja folds constant expressions while compiling, so saving `{{ 'x' * 10**10 }}`
    or `{{ 9**9**9 }}` would allocate gigabytes or compute for hours inside the request; at render
    `{{ name * 10**9 }}` would build the whole string before the output limit is checked.
    Intercepted operators are never folded and go through `call_binop`, which refuses oversized
    results before computing them.
    """

    intercepted_binops = frozenset({"*", "**", "%"})
    code_generator_class = _BudgetedCodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters[_LOOP_HOOK] = _loop_hook
        self.filters.update(_bounded_filters(self.filters))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # Recursion (macros calling themselves, `loop(children)`) goes through here, not through a for.
        if time.perf_counter() > _deadline():
            raise _over_budget()
        if isinstance(__obj, LoopContext) and args:
            args = (_budgeted(args[0]), *args[1:])
        elif isinstance(getattr(__obj, "__self__", None), str):
            args = _check_str_method(__obj.__self__, __obj.__name__, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, str) and len(result) > MAX_OUTPUT:
            # A macro calling itself twice doubles its output per level: stop it here, not at the end.
            raise RenderFailed(f"a call returned more than {MAX_OUTPUT} characters")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "%" and isinstance(left, str):
            _check_printf(left)
        elif operator == "*":
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


# One C call cannot be interrupted, and it holds the interpreter (the event loop too) while it
# runs: `'x'.ljust(10**9)` or `'%0999999999d' % 1` would take seconds whatever the budget. So the
# operations that build a string of a size the template chooses check that size first.
_PRINTF_FIELD = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_PADDING_METHODS = frozenset({"ljust", "rjust", "center", "zfill"})


def _too_wide(number: str | int) -> bool:
    if isinstance(number, str):
        return len(number) > 6 or int(number) > MAX_OUTPUT
    return _is_int(number) and number > MAX_OUTPUT


def _too_large(what: str) -> SecurityError:
    return SecurityError(f"{what} would be longer than {MAX_OUTPUT} characters")


def _check_printf(fmt: str) -> None:
    for field in _PRINTF_FIELD.finditer(fmt):
        for part in field.groups():
            if part == "*":
                raise SecurityError("a '%' width or precision must be written in the format")
            if part and _too_wide(part):
                raise _too_large("a '%' field")


def _check_format(fmt: str) -> None:
    try:
        fields = list(Formatter().parse(fmt))
    except ValueError:
        return  # format() itself refuses it
    for _, _, spec, _ in fields:
        if spec and ("{" in spec or any(_too_wide(n) for n in re.findall(r"\d+", spec))):
            raise _too_large("a format() field")


def _check_str_method(s: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a str method call whose result would be too long; the args to call it with."""
    if name in _PADDING_METHODS:
        width = args[0] if args else kwargs.get("width", 0)
        if _too_wide(width):
            raise _too_large(f"str.{name}()")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(size) and size * s.count("\t") > MAX_OUTPUT:
            raise _too_large("str.expandtabs()")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(s, args[0], args[1], args[2] if len(args) > 2 else -1)
    elif name == "join" and len(args) == 1:
        items = list(args[0])
        if len(s) * max(0, len(items) - 1) > MAX_OUTPUT:
            raise _too_large("str.join()")
        return (items,)
    return args


def _check_replace(s: str, old: str, new: str, count: Any) -> None:
    n = len(s) + 1 if old == "" else s.count(old)
    if _is_int(count) and count >= 0:
        n = min(n, count)
    if n * len(new) > MAX_OUTPUT:
        raise _too_large("replace()")


def _bounded_filters(filters: dict[str, Any]) -> dict[str, Any]:
    """The built-in filters that pad, repeat or join, with the size of their result checked first."""
    center, indent, fmt, replace, join, slice_ = (
        filters[name] for name in ("center", "indent", "format", "replace", "join", "slice")
    )

    def do_center(value: str, width: int = 80) -> str:
        if _too_wide(width):
            raise _too_large("center")
        return str(center(value, width))

    def do_indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
        if (len(width) if isinstance(width, str) else width) * (str(s).count("\n") + 1) > MAX_OUTPUT:
            raise _too_large("indent")
        return str(indent(s, width, first, blank))

    def do_format(value: str, *args: Any, **kwargs: Any) -> str:
        _check_printf(str(value))
        return str(fmt(value, *args, **kwargs))

    @pass_eval_context
    def do_replace(eval_ctx: EvalContext, s: str, old: str, new: str, count: int | None = None) -> str:
        _check_replace(str(s), str(old), str(new), -1 if count is None else count)
        return str(replace(eval_ctx, s, old, new, count))

    @pass_eval_context
    def do_join(eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
        items = list(value)
        if len(str(d)) * max(0, len(items) - 1) > MAX_OUTPUT:
            raise _too_large("join")
        return str(join(eval_ctx, items, d, attribute))

    @pass_eval_context
    def do_slice(eval_ctx: EvalContext, value: Any, slices: int, fill_with: Any = None) -> Any:
        if _too_wide(slices):
            raise SecurityError(f"slice makes at most {MAX_OUTPUT} slices")
        return slice_(eval_ctx, value, slices, fill_with)

    return {
        "center": do_center,
        "indent": do_indent,
        "format": do_format,
        "replace": do_replace,
        "join": do_join,
        "slice": do_slice,
    }


def _env(autoescape: bool) -> SandboxedEnvironment:
    return _BoundedSandbox(undefined=StrictUndefined, autoescape=autoescape, auto_reload=False, cache_size=0)


_TEXT = _env(False)
_HTML = _env(True)


def _invalid(field: str, error: str) -> InvalidInput:
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

    def __init__(self, *, threads: int = RENDER_THREADS) -> None:
        self._cache: dict[tuple[str, int], dict[str, Any]] = {}
        # Threads start on the first offload, not here, and end with the renderer (or `close`).
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="render")
        weakref.finalize(self, self._pool.shutdown, wait=False)

    async def offload(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` (which renders) on the render threads, so the event loop keeps serving meanwhile.

        Hand over a whole batch at once: one hop per batch costs nothing next to one per message.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def render_async(
        self, template: Any, variables: dict[str, Any], implicit: dict[str, Any], *, budget_ms: float
    ) -> Rendered:
        """`render` on the render threads."""
        return await self.offload(self.render, template, variables, implicit, budget_ms=budget_ms)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

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

    def render(
        self,
        template: Any,
        variables: dict[str, Any],
        implicit: dict[str, Any],
        *,
        budget_ms: float | None = None,
    ) -> Rendered:
        """Render every part within `budget_ms`; a declared variable missing from `variables` fails it.

        Blocks for up to the budget: call it through `offload` (or `render_async`) from the loop.
        """
        missing = sorted(v for v in template.variables if v not in variables and v not in implicit)
        if missing:
            raise RenderFailed(f"missing variables: {', '.join(missing)}", details={"missing": missing})
        context = {**variables, **implicit}
        out: dict[str, str | None] = {"subject": None, "body": "", "html": None}
        outer = _deadline()
        _budget.deadline = time.perf_counter() + budget_ms / 1000 if budget_ms is not None else math.inf
        try:
            for field, compiled in self._compiled(template).items():
                out[field] = _bounded_output(field, compiled.generate(context))
        except RenderTimeout:
            log.warning(
                "template %s (version %s) ran past its %s ms render budget",
                template.id,
                template.version,
                budget_ms,
            )
            raise
        except RenderFailed:
            raise
        except TemplateError as exc:
            raise RenderFailed(f"render failed: {exc}", details={"error": str(exc)}) from None
        except Exception as exc:  # anything a hostile template can provoke inside the sandbox
            raise RenderFailed(f"render failed: {type(exc).__name__}", details={"error": str(exc)[:500]}) from None
        finally:
            _budget.deadline = outer
        subject = out["subject"]
        if subject is not None:
            # A header never carries a line break, whatever the variables contain.
            subject = " ".join(subject.split())
        return Rendered(subject=subject, body=out["body"] or "", html=out["html"])


def _bounded_output(field: str, chunks: Iterator[str]) -> str:
    """Join a render's output, stopping as soon as it passes MAX_OUTPUT (not once it is all built)."""
    parts = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT:
            raise RenderFailed(f"{field} renders to more than {MAX_OUTPUT} characters")
        parts.append(chunk)
    return "".join(parts)
