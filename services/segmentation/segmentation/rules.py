"""The segment rule language: a JSON tree validated with pointed errors and compiled to SQL.

A rule is one node:

* ``{"all": [node, ...]}``, ``{"any": [node, ...]}``, ``{"not": node}``;
* ``{"attr": "<attribute>", "op": "<op>", "value": ...}`` over a profile attribute, e.g.
  ``{"attr": "orders", "op": ">=", "value": 3}`` or ``{"attr": "lifecycle", "op": "in", "value": ["lapsed", "lost"]}``;
* ``{"purchases": {"measure": "distinct_days", "category": "wine", "day_of_week": "friday",
  "within_days": 56}, "op": ">=", "value": 3}``: a windowed aggregate over the customer's purchased
  items (measures: ``orders``, ``distinct_days``, ``quantity``, ``amount``; filters: ``category``,
  ``sku`` (a string or a list), ``day_of_week`` (names or ISO numbers 1=Monday..7=Sunday)).

The same compiled SQL boolean serves the consumer (restricted to the customers of a batch, in its
transaction) and the sweep (all profiles, for changes that only the passage of time causes), so
both paths agree by construction. Time-relative attributes read the bound ``:now``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from segmentation.errors import InvalidRule

MAX_DEPTH = 12
MAX_NODES = 200
MAX_LIST = 1000
MAX_NUMBER = 1e15
MAX_WINDOW_DAYS = 3650

NUMBER = "number"
STRING = "string"
BOOL = "bool"
LIST = "list"

NOW = "CAST(:now AS timestamptz)"
LIFECYCLE_SQL = f"seg_lifecycle(p.orders, p.first_purchase_at, p.last_purchase_at, p.cadence_days, {NOW})"


@dataclass(frozen=True)
class Attribute:
    sql: str
    kind: str
    values: tuple[str, ...] | None = None  # closed set of allowed values (enums)
    doc: str = ""


LIFECYCLES = ("prospect", "new", "active", "at_risk", "lapsed", "lost")

ATTRIBUTES: dict[str, Attribute] = {
    "orders": Attribute("p.orders", NUMBER, doc="orders not fully refunded"),
    "revenue": Attribute("p.revenue", NUMBER, doc="net of refunds"),
    "margin": Attribute("p.margin", NUMBER, doc="net of refunds and discounts, minus item cost where known"),
    "avg_check": Attribute("p.avg_check", NUMBER),
    "discount_share": Attribute("p.discount_share", NUMBER, doc="discounts / gross amount, 0..1"),
    "discounted_orders_share": Attribute(
        "p.discounted_orders_share", NUMBER, doc="share of orders with a discount, 0..1"
    ),
    "cadence_days": Attribute("p.cadence_days", NUMBER, doc="median days between purchase days"),
    "days_since_last_purchase": Attribute(f"(extract(epoch FROM {NOW} - p.last_purchase_at) / 86400)", NUMBER),
    "days_since_first_purchase": Attribute(f"(extract(epoch FROM {NOW} - p.first_purchase_at) / 86400)", NUMBER),
    "days_until_predicted_purchase": Attribute(
        f"(extract(epoch FROM p.predicted_next_purchase - {NOW}) / 86400)", NUMBER
    ),
    "rfm_r": Attribute("p.rfm_r", NUMBER),
    "rfm_f": Attribute("p.rfm_f", NUMBER),
    "rfm_m": Attribute("p.rfm_m", NUMBER),
    "favourite_dow": Attribute("p.favourite_dow", NUMBER, doc="ISO day of week 1..7 of most purchases"),
    "favourite_hour": Attribute("p.favourite_hour", NUMBER),
    "last_feedback_rating": Attribute("p.last_feedback_rating", NUMBER),
    "lifecycle": Attribute(LIFECYCLE_SQL, STRING, LIFECYCLES),
    "churn_kind": Attribute(f"seg_churn_kind({LIFECYCLE_SQL}, p.orders)", STRING, ("regular", "new", "one_off")),
    "value_tier": Attribute("p.value_tier", STRING, ("core", "middle", "unprofitable")),
    "discount_affinity": Attribute("p.discount_affinity", STRING, ("deal_hunter", "discount_lover", "none")),
    "rfm_group": Attribute(
        "p.rfm_group",
        STRING,
        (
            "champions",
            "loyal",
            "new_or_promising",
            "cant_lose",
            "at_risk",
            "hibernating",
            "needs_attention",
        ),
    ),
    "last_feedback_topic": Attribute("p.last_feedback_topic", STRING, ("quality", "price", "service", "other")),
    "favourite_category": Attribute("p.favourite_category", STRING),
    "favourite_sku": Attribute("(p.favourite_product ->> 'sku')", STRING),
    "favourite_size": Attribute("p.favourite_size", STRING),
    "favourite_color": Attribute("p.favourite_color", STRING),
    "acquisition_channel": Attribute("p.acquisition_channel", STRING),
    "top_categories": Attribute("p.top_categories", LIST, doc="up to 5 categories, recency weighted"),
}
TRAITS = (
    "email",
    "phone",
    "first_name",
    "last_name",
    "gender",
    "city",
    "timezone",
    "locale",
    "referred_by",
    "preferred_channel",
    "birth_date",
)
for _t in TRAITS:
    ATTRIBUTES[f"traits.{_t}"] = Attribute(f"(p.traits ->> '{_t}')", STRING)
for _c in ("email", "sms", "push"):
    ATTRIBUTES[f"consents.{_c}"] = Attribute(f"(p.consents ->> '{_c}')::boolean", BOOL)
for _c in ("email", "sms", "push"):
    for _s in ("sent", "delivered", "opened", "clicked", "failed", "unsubscribed"):
        ATTRIBUTES[f"engagement.{_c}.{_s}"] = Attribute(
            f"coalesce((p.engagement -> '{_c}' ->> '{_s}')::int, 0)", NUMBER
        )

OPS_BY_KIND: dict[str, tuple[str, ...]] = {
    NUMBER: ("=", "!=", "<", "<=", ">", ">=", "in", "not_in", "exists", "not_exists"),
    STRING: ("=", "!=", "in", "not_in", "exists", "not_exists"),
    BOOL: ("=", "!=", "exists", "not_exists"),
    LIST: ("contains", "not_contains", "exists", "not_exists"),
}
COMPARE = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
MEASURES = {
    "orders": "count(DISTINCT i.order_id)",
    "distinct_days": "count(DISTINCT i.local_date)",
    "quantity": "coalesce(sum(i.quantity - i.refunded_qty), 0)",
    "amount": "coalesce(sum(i.amount * (i.quantity - i.refunded_qty) / i.quantity), 0)",
}
DAYS = {
    "monday": 1,
    "tuesday": 2,
    "wednesday": 3,
    "thursday": 4,
    "friday": 5,
    "saturday": 6,
    "sunday": 7,
}
DAYS.update({k[:3]: v for k, v in list(DAYS.items())})
PURCHASE_KEYS = ("measure", "category", "sku", "day_of_week", "within_days")
_ATTR_NAME = re.compile(r"^[a-z_][a-z0-9_.]{0,80}$")


@dataclass
class Compiled:
    """A rule as a SQL boolean over `profiles p`, its bind parameters, and what it reads."""

    sql: str
    params: dict[str, Any] = field(default_factory=dict)
    uses_time: bool = False
    uses_purchases: bool = False


class _Errors:
    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, path: str, msg: str) -> None:
        if len(self.items) < 20:
            self.items.append({"path": path, "msg": msg})


def _is_number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= MAX_NUMBER


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 256 and "\x00" not in v


def _holds(left: float, op: str, right: float) -> bool:
    return {
        "=": left == right,
        "!=": left != right,
        "<": left < right,
        "<=": left <= right,
        ">": left > right,
        ">=": left >= right,
    }[op]


class _Compiler:
    def __init__(self, prefix: str, set_based: bool = False) -> None:
        self.prefix = prefix
        self.set_based = set_based
        self.params: dict[str, Any] = {}
        self.errors = _Errors()
        self.nodes = 0
        self.uses_time = False
        self.uses_purchases = False

    def bind(self, value: Any, cast: str) -> str:
        name = f"{self.prefix}{len(self.params)}"
        self.params[name] = value
        return f"CAST(:{name} AS {cast})"

    def node(self, node: Any, path: str, depth: int) -> str:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.errors.add(path, f"rule too large: at most {MAX_NODES} nodes")
            return "false"
        if depth > MAX_DEPTH:
            self.errors.add(path, f"nested too deeply: at most {MAX_DEPTH} levels")
            return "false"
        if not isinstance(node, dict):
            self.errors.add(path, f"must be an object (a rule node), got {type(node).__name__}")
            return "false"
        for combinator in ("all", "any"):
            if combinator in node:
                extra = sorted(set(node) - {combinator})
                if extra:
                    self.errors.add(path, f"'{combinator}' node must have no other keys, found {extra}")
                children = node[combinator]
                if not isinstance(children, list) or not children:
                    self.errors.add(f"{path}.{combinator}", "must be a non-empty list of rule nodes")
                    return "false"
                parts = [self.node(c, f"{path}.{combinator}[{i}]", depth + 1) for i, c in enumerate(children)]
                joiner = " AND " if combinator == "all" else " OR "
                return "(" + joiner.join(parts) + ")"
        if "not" in node:
            extra = sorted(set(node) - {"not"})
            if extra:
                self.errors.add(path, f"'not' node must have no other keys, found {extra}")
            return f"(NOT {self.node(node['not'], f'{path}.not', depth + 1)})"
        if "attr" in node:
            return self.attr(node, path)
        if "purchases" in node:
            return self.purchases(node, path)
        self.errors.add(path, "unknown node: expected one of the keys 'all', 'any', 'not', 'attr', 'purchases'")
        return "false"

    def attr(self, node: dict[str, Any], path: str) -> str:
        extra = sorted(set(node) - {"attr", "op", "value"})
        if extra:
            self.errors.add(path, f"unknown keys {extra}; an attribute node has 'attr', 'op', 'value'")
        name = node.get("attr")
        if not isinstance(name, str) or not _ATTR_NAME.match(name) or name not in ATTRIBUTES:
            shown = name if isinstance(name, str) and len(name) < 100 else type(name).__name__
            self.errors.add(f"{path}.attr", f"unknown attribute {shown!r}; see GET /v1/segments/attributes")
            return "false"
        attr = ATTRIBUTES[name]
        if name.startswith("days_") or name in ("lifecycle", "churn_kind"):
            self.uses_time = True
        op = node.get("op")
        allowed = OPS_BY_KIND[attr.kind]
        if op not in allowed:
            self.errors.add(
                f"{path}.op",
                f"operator {op!r} is not allowed for {name!r}; expected one of {list(allowed)}",
            )
            return "false"
        return self.compare(attr.sql, attr, op, node, path, name)

    def compare(self, expr: str, attr: Attribute, op: str, node: dict[str, Any], path: str, name: str) -> str:
        if op in ("exists", "not_exists"):
            if "value" in node:
                self.errors.add(f"{path}.value", f"operator {op!r} takes no value")
            if attr.kind == LIST:
                test = f"(jsonb_array_length({expr}) > 0)"
                return f"coalesce({test}, false)" if op == "exists" else f"NOT coalesce({test}, false)"
            return f"({expr} IS NOT NULL)" if op == "exists" else f"({expr} IS NULL)"
        if "value" not in node:
            self.errors.add(f"{path}.value", f"operator {op!r} needs a value")
            return "false"
        value = node["value"]
        vpath = f"{path}.value"
        if op in ("in", "not_in"):
            if not isinstance(value, list) or not value or len(value) > MAX_LIST:
                self.errors.add(vpath, f"operator {op!r} needs a non-empty list of at most {MAX_LIST} values")
                return "false"
            for i, v in enumerate(value):
                self.check_scalar(v, attr, f"{vpath}[{i}]", name)
            if attr.kind == NUMBER:
                arr = self.bind([float(v) if _is_number(v) else 0.0 for v in value], "double precision[]")
            else:
                arr = self.bind([v if isinstance(v, str) else "" for v in value], "text[]")
            test = f"({expr} = ANY({arr}))"
            return f"coalesce({test}, false)" if op == "in" else f"NOT coalesce({test}, false)"
        if attr.kind == LIST:
            if not _is_text(value):
                self.errors.add(vpath, "must be a string of 1-256 characters without NUL")
                return "false"
            test = f"jsonb_exists({expr}, {self.bind(value, 'text')})"
            return f"coalesce({test}, false)" if op == "contains" else f"NOT coalesce({test}, false)"
        if not self.check_scalar(value, attr, vpath, name):
            return "false"
        if attr.kind == NUMBER:
            rhs = self.bind(float(value), "double precision")
        elif attr.kind == BOOL:
            rhs = self.bind(value, "boolean")
        else:
            rhs = self.bind(value, "text")
        return f"coalesce({expr} {COMPARE[op]} {rhs}, false)"

    def check_scalar(self, value: Any, attr: Attribute, path: str, name: str) -> bool:
        if attr.kind == NUMBER:
            if not _is_number(value):
                self.errors.add(path, f"{name!r} is a number: expected a finite number within ±{MAX_NUMBER:.0e}")
                return False
        elif attr.kind == BOOL:
            if not isinstance(value, bool):
                self.errors.add(path, f"{name!r} is a boolean: expected true or false")
                return False
        else:
            if not _is_text(value):
                self.errors.add(path, f"{name!r} is text: expected a string of 1-256 characters without NUL")
                return False
            if attr.values is not None and value not in attr.values:
                self.errors.add(
                    path,
                    f"{value!r} is not a value of {name!r}; expected one of {list(attr.values)}",
                )
                return False
        return True

    def purchases(self, node: dict[str, Any], path: str) -> str:
        self.uses_purchases = True
        self.uses_time = True
        extra = sorted(set(node) - {"purchases", "op", "value"})
        if extra:
            self.errors.add(path, f"unknown keys {extra}; a purchases node has 'purchases', 'op', 'value'")
        spec = node.get("purchases")
        ppath = f"{path}.purchases"
        if not isinstance(spec, dict):
            self.errors.add(
                ppath,
                "must be an object with 'within_days' and optional 'measure', 'category', 'sku', 'day_of_week'",
            )
            return "false"
        unknown = sorted(set(spec) - set(PURCHASE_KEYS))
        if unknown:
            self.errors.add(ppath, f"unknown keys {unknown}; allowed: {list(PURCHASE_KEYS)}")
        measure = spec.get("measure", "orders")
        if measure not in MEASURES:
            self.errors.add(f"{ppath}.measure", f"unknown measure {measure!r}; expected one of {list(MEASURES)}")
            return "false"
        days = spec.get("within_days")
        if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= MAX_WINDOW_DAYS:
            self.errors.add(
                f"{ppath}.within_days",
                f"required: a whole number of days between 1 and {MAX_WINDOW_DAYS}",
            )
            return "false"
        where = [
            "i.customer_id = p.customer_id",
            "i.quantity > i.refunded_qty",
            f"i.occurred_at > {NOW} - make_interval(days => {int(days)})",
        ]
        for key, column in (("category", "lower(i.category)"), ("sku", "i.sku")):
            if key not in spec:
                continue
            values = spec[key] if isinstance(spec[key], list) else [spec[key]]
            if not values or len(values) > MAX_LIST or not all(_is_text(v) for v in values):
                self.errors.add(
                    f"{ppath}.{key}",
                    "must be a string or a non-empty list of strings (1-256 characters, no NUL)",
                )
                return "false"
            if key == "category":
                values = [v.lower() for v in values]
            where.append(f"{column} = ANY({self.bind(values, 'text[]')})")
        if "day_of_week" in spec:
            raw = spec["day_of_week"] if isinstance(spec["day_of_week"], list) else [spec["day_of_week"]]
            dows: list[int] = []
            for i, d in enumerate(raw):
                if isinstance(d, str) and d.lower() in DAYS:
                    dows.append(DAYS[d.lower()])
                elif isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 7:
                    dows.append(d)
                else:
                    self.errors.add(
                        f"{ppath}.day_of_week[{i}]"
                        if isinstance(spec["day_of_week"], list)
                        else f"{ppath}.day_of_week",
                        "expected a day name (monday..sunday, mon..sun) or ISO number 1-7",
                    )
                    return "false"
            if not dows:
                self.errors.add(f"{ppath}.day_of_week", "must name at least one day")
                return "false"
            where.append(f"i.local_dow = ANY(ARRAY[{','.join(str(d) for d in sorted(set(dows)))}]::smallint[])")
        op = node.get("op")
        if op not in COMPARE:
            self.errors.add(
                f"{path}.op",
                f"operator {op!r} is not allowed for an aggregate; expected one of {list(COMPARE)}",
            )
            return "false"
        value = node.get("value")
        if not _is_number(value):
            self.errors.add(f"{path}.value", f"expected a finite number within ±{MAX_NUMBER:.0e}")
            return "false"
        rhs = self.bind(float(value), "double precision")
        zero_matches = _holds(0.0, op, float(value))  # a customer without any matching item has measure 0
        if self.set_based:
            # For a pass over everyone: aggregate the window once per customer and test membership in
            # that set (a hashed subplan) instead of one correlated subquery per profile.
            where.remove("i.customer_id = p.customer_id")
            grouped = f"SELECT i.customer_id FROM purchase_items i WHERE {' AND '.join(where)} GROUP BY i.customer_id"
            if zero_matches:
                return f"(p.customer_id NOT IN ({grouped} HAVING NOT ({MEASURES[measure]} {COMPARE[op]} {rhs})))"
            return f"(p.customer_id IN ({grouped} HAVING {MEASURES[measure]} {COMPARE[op]} {rhs}))"
        sub = f"(SELECT {MEASURES[measure]} FROM purchase_items i WHERE {' AND '.join(where)})"
        test = f"coalesce({sub} {COMPARE[op]} {rhs}, false)"
        if not zero_matches:
            # Cheap guard: no purchase in the window means no match, so most rows skip the subquery.
            return f"(p.last_purchase_at > {NOW} - make_interval(days => {int(days)}) AND {test})"
        return test


def compile_rule(rule: Any, *, prefix: str = "r", set_based: bool = False) -> Compiled:
    """Validate a rule and compile it to a SQL boolean over `profiles p`; raise InvalidRule naming the bad node.

    `set_based` compiles windowed aggregates for a pass over all profiles (grouped once, hashed);
    the default suits a few customers (one indexed subquery each). Both mean the same.
    """
    compiler = _Compiler(prefix, set_based)
    sql = compiler.node(rule, "rule", 0)
    if compiler.errors.items:
        first = compiler.errors.items[0]
        raise InvalidRule(f"{first['path']}: {first['msg']}", details={"errors": compiler.errors.items})
    return Compiled(
        sql=sql,
        params=compiler.params,
        uses_time=compiler.uses_time,
        uses_purchases=compiler.uses_purchases,
    )


def describe_attributes() -> list[dict[str, Any]]:
    """The attributes a rule can use, with their kinds, operators and allowed values."""
    return [
        {
            "attr": name,
            "kind": a.kind,
            "ops": list(OPS_BY_KIND[a.kind]),
            "values": list(a.values) if a.values else None,
            "doc": a.doc or None,
        }
        for name, a in ATTRIBUTES.items()
    ]
