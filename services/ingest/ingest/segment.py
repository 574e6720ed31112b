"""The Segment tracking API on our event contract: each Segment message mapped to one contract event
(or to the reasons it cannot be one), the mapped events accepted by `ingest_events` exactly as
POST /v1/events accepts them, and what fails recorded as a rejection instead of vanishing.

The mapping table is in the service README; this module is its only implementation.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

import orjson
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.events import ingest_events
from ingest.repository import RejectionRepository, RejectionRow

API = "segment"
CALLS = ("track", "identify", "page", "screen", "alias", "group")

REJECTED = Counter(
    "crm_ingest_segment_rejected_total",
    "Messages of accepted Segment requests that failed mapping or validation (kept in the rejections table)",
    ["source", "call"],
)

_CENT = Decimal("0.01")
_PLACES = Decimal("0.0001")
_ZERO = Decimal(0)
# Fields of a contract item named otherwise in a Segment product.
_ITEM_FIELDS = {"unit_price": "price"}
# A timestamp as Segment's own examples write them (fromisoformat takes the padded ones).
_LOOSE_TIME = re.compile(
    r"^(\d{4})-(\d{1,2})-(\d{1,2})[T ](\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6})\d*)?)?\s*(Z|[+-]\d{2}:?\d{2})?$"
)


@dataclass(slots=True)
class MappedMessage:
    """A Segment message as a contract event, or the reasons it is not one.

    `origins` names, for a contract field (`customer_id`, `properties.total`), the Segment field it
    was taken from, so validation errors can be reported in the sender's terms.
    """

    call: str | None
    event_name: str | None
    message_id: str | None
    event: dict[str, Any] | None = None
    reasons: list[dict[str, Any]] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)


def _reason(where: str, msg: str) -> dict[str, Any]:
    return {"field": where, "msg": msg}


def _as_id(value: Any) -> Any:
    """Segment ids may be JSON numbers; the contract's ids are strings."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def parse_time(value: Any) -> datetime:
    """A Segment timestamp: ISO 8601, UTC when it names no offset (as Segment reads it)."""
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        match = _LOOSE_TIME.match(value.strip())
        if match is None:
            raise
        year, month, day, hour, minute, second, fraction, offset = match.groups()
        parsed = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")),
        )
        if offset and offset != "Z":
            parsed = datetime.fromisoformat(parsed.isoformat() + offset[:3] + ":" + offset[-2:])
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


_TIME_HINT = "must be an ISO 8601 timestamp such as 2026-01-05T11:58:00.000Z"


def _time_field(value: Any, name: str, reasons: list[dict[str, Any]]) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return parse_time(value)
    except (ValueError, OverflowError):
        reasons.append(_reason(name, _TIME_HINT))
        return None


def occurred_at(
    message: dict[str, Any], *, batch_sent_at: Any, now: datetime, reasons: list[dict[str, Any]]
) -> datetime:
    """When the message happened, corrected for the sender's clock skew as Segment does it:
    `now - (sentAt - originalTimestamp)`, where a server library's `timestamp` is the original one;
    without `sentAt` the timestamp as sent; without any timestamp, now. `batch_sent_at` (the
    batch's `sentAt`, raw or parsed once for the batch) applies when the message has none. An
    aware datetime: the contract's validation takes it as it is, with no string to parse again."""
    original = message.get("originalTimestamp")
    if original is not None:
        base = _time_field(original, "originalTimestamp", reasons)
    else:
        base = _time_field(message.get("timestamp"), "timestamp", reasons)
    sent_at = message.get("sentAt")
    sent = _time_field(batch_sent_at if sent_at is None else sent_at, "sentAt", reasons)
    if base is None:
        return now
    if sent is None:
        return base
    try:
        return base + (now - sent)
    except OverflowError:
        reasons.append(_reason("sentAt", "is too far from the timestamp to correct it"))
        return base


def _plain(amount: Decimal) -> str:
    """A plain decimal string with at least cents and at most the contract's four places.

    A JSON float read through its shortest repr gives back the digits the sender wrote (19.99, not
    19.989999...); rounding to four places drops float noise such as 0.30000000000000004.
    """
    try:
        amount = amount.quantize(_PLACES, ROUND_HALF_EVEN)
    except InvalidOperation:
        return format(amount, "f")  # too many digits to round: the contract names its range
    whole, _, fraction = format(amount, "f").partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


def _fast_amount(value: Any) -> str | None:
    """`amount` of a finite float or an int without Decimal, for the common case (this runs for every
    price of every product): a float's shortest repr such as 19.9 or 4.99 padded to cents. None for
    anything else, and for exponents or more than four places. (A float's repr always has a '.' or
    an 'e', and no trailing zero but in x.0.)"""
    kind = type(value)
    if kind is float:
        text = repr(value)
        dot = text.find(".")  # none in inf, nan and 1e+16
        if dot > 0 and len(text) - dot <= 5 and "e" not in text:
            return text + "0" if len(text) - dot == 2 else text
    elif kind is int:
        return f"{value}.00"
    return None


def amount(value: Any, where: str, reasons: list[dict[str, Any]]) -> Any:
    """A Segment amount (a JSON number) as the contract's decimal string; strings and other values
    are passed on as they are, so the contract judges them as it judges a posted event's."""
    text = _fast_amount(value)
    if text is not None:
        return text
    if isinstance(value, bool):
        reasons.append(_reason(where, "must be a number, not a boolean"))
        return None
    if isinstance(value, int):
        return f"{value}.00"
    if isinstance(value, float):
        if not math.isfinite(value):
            reasons.append(_reason(where, "must be a finite number"))
            return None
        return _plain(Decimal(repr(value)))
    return value


def _decimal(value: Any) -> Decimal | None:
    """The value of a plain decimal string or number, or None when it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = Decimal(value if isinstance(value, str) else repr(value) if isinstance(value, float) else value)
    except (InvalidOperation, TypeError, ValueError):
        return None
    return number if number.is_finite() else None


def _at(where: str, index: int, name: str | None = None) -> str:
    """The Segment path of a product's field; the one product of a Product Added is the properties."""
    path = where if where == "properties" else f"{where}[{index}]"
    return path if name is None else f"{path}.{name}"


def _items(
    products: list[Any], where: str, reasons: list[dict[str, Any]], *, refund: bool = False
) -> list[dict[str, Any]]:
    """Segment products as contract items (`sku` or `product_id`, `price` as `unit_price`).

    The hot path of a batch of orders: written for speed (type checks, the float prices of the
    common case turned into decimal strings inline), and the field names of a failure are only
    joined when there is one."""
    items: list[dict[str, Any]] = []
    append = items.append
    for index, product in enumerate(products):
        if type(product) is not dict:
            reasons.append(_reason(_at(where, index), "a product must be an object"))
            continue
        get = product.get
        sku = get("sku")
        if sku is None:
            sku = get("product_id")
        item: dict[str, Any] = {} if sku is None else {"sku": sku if type(sku) is str else _as_id(sku)}
        if not refund:
            value = get("name")
            if value is not None:
                item["name"] = value
            value = get("category")
            if value is not None:
                item["category"] = value
            value = get("brand")
            if value is not None:
                item["brand"] = value
        quantity = get("quantity")
        if quantity is not None:
            item["quantity"] = (
                _plain(Decimal(repr(quantity))) if type(quantity) is float and math.isfinite(quantity) else quantity
            )
        price = get("price")
        if price is not None:
            if type(price) is float:
                # _fast_amount inlined: a float's shortest repr (19.9, 4.99) padded to cents.
                text = repr(price)
                dot = text.find(".")
                if dot > 0 and len(text) - dot <= 5 and "e" not in text:
                    item["unit_price"] = text + "0" if len(text) - dot == 2 else text
                else:
                    item["unit_price"] = amount(price, _at(where, index, "price"), reasons)
            else:
                fast = _fast_amount(price)
                item["unit_price"] = fast if fast is not None else amount(price, _at(where, index, "price"), reasons)
        if not refund:
            discount = get("discount")
            if discount is not None:
                fast = _fast_amount(discount)
                item["discount"] = (
                    fast if fast is not None else amount(discount, _at(where, index, "discount"), reasons)
                )
        append(item)
    return items


def _line_amounts(items: list[dict[str, Any]]) -> list[Decimal] | None:
    """quantity x unit_price of every item, or None when one of them is not a number."""
    lines = []
    for item in items:
        price = _decimal(item.get("unit_price"))
        quantity = _decimal(item.get("quantity", 1))
        if price is None or quantity is None:
            return None
        lines.append(price * quantity)
    return lines


def _spread_discount(items: list[dict[str, Any]], discount: Decimal) -> None:
    """Give an order-level discount to the items as line discounts, in proportion to their amounts
    (the contract has no order discount; its total is the lines after their discounts)."""
    lines = _line_amounts(items)
    if not lines or discount <= 0 or any("discount" in item for item in items):
        return
    gross = sum(lines, _ZERO)
    if gross <= 0:
        return
    shares = [(discount * line / gross).quantize(_CENT, ROUND_HALF_EVEN) for line in lines]
    # The cents lost to rounding go to the largest line, so the shares add up to the discount.
    largest = max(range(len(lines)), key=lines.__getitem__)
    shares[largest] += discount - sum(shares, _ZERO)
    for item, share in zip(items, shares, strict=True):
        if share:
            item["discount"] = _plain(share)


def _net_total(items: list[dict[str, Any]]) -> str | None:
    lines = _line_amounts(items)
    if lines is None:
        return None
    discounts = [_decimal(item.get("discount", 0)) for item in items]
    if any(d is None for d in discounts):
        return None
    return _plain(sum(lines, _ZERO) - sum((d for d in discounts if d is not None), _ZERO))


def _order_total(
    props: dict[str, Any], items: list[dict[str, Any]] | None, reasons: list[dict[str, Any]]
) -> tuple[Any, str]:
    """The contract's total (the items after discounts, before shipping and tax) and its origin.

    `total` less `shipping` and `tax`, else `subtotal`, else `revenue` less `discount`, else the
    items' sum; a total that still disagrees with the items is the contract's to refuse.
    """

    total = props.get("total")
    if total is not None:
        return _less(props, total, ("shipping", "tax"), "properties.total", reasons), "properties.total"
    if props.get("subtotal") is not None:
        return amount(props["subtotal"], "properties.subtotal", reasons), "properties.subtotal"
    if props.get("revenue") is not None:
        return _less(props, props["revenue"], ("discount",), "properties.revenue", reasons), "properties.revenue"
    return (_net_total(items) if items else None), "properties.products"


def _less(props: dict[str, Any], value: Any, names: tuple[str, ...], origin: str, reasons: list[dict[str, Any]]) -> Any:
    """The amount `value` less the amounts of `props` named `names` (those present)."""
    result = amount(value, origin, reasons)
    deductions = [amount(props[n], f"properties.{n}", reasons) for n in names if props.get(n) is not None]
    if not deductions:
        return result
    base = _decimal(result)
    parts = [_decimal(d) for d in deductions]
    if base is None or any(p is None for p in parts):
        return result  # the contract (or the reasons above) name what is wrong
    return _plain(base - sum((p for p in parts if p is not None), _ZERO))


def _purchase(props: dict[str, Any], mapped: MappedMessage) -> dict[str, Any]:
    get = props.get
    reasons = mapped.reasons
    out: dict[str, Any] = {}
    order_id = get("order_id")
    if order_id is not None:
        out["order_id"] = order_id if type(order_id) is str else _as_id(order_id)
    items: list[dict[str, Any]] | None = None
    products = get("products")
    if type(products) is list:
        items = _items(products, "properties.products", reasons)
        discount = get("discount")
        if discount is not None:
            spread = _decimal(amount(discount, "properties.discount", reasons))
            if spread is not None:
                _spread_discount(items, spread)
        out["items"] = items
    elif products is not None:
        reasons.append(_reason("properties.products", "must be an array of products"))
    total = get("total")
    text = None if total is None or get("shipping") is not None or get("tax") is not None else _fast_amount(total)
    if text is not None:
        out["total"] = text  # the common case: a total with nothing to deduct (its origin is the default)
    else:
        total, origin = _order_total(props, items, reasons)
        if total is not None:
            out["total"] = total
        mapped.origins["properties.total"] = origin
    coupon = get("coupon")
    if coupon is not None:
        out["coupon_code"] = coupon if type(coupon) is str else _as_id(coupon)
    currency = get("currency")
    if currency is not None:
        out["currency"] = currency.upper() if isinstance(currency, str) else currency
    return out


def _refund(props: dict[str, Any], mapped: MappedMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if props.get("order_id") is not None:
        out["order_id"] = _as_id(props["order_id"])
    products = props.get("products")
    items = None
    if isinstance(products, list):
        items = out["items"] = _items(products, "properties.products", mapped.reasons, refund=True)
    elif products is not None:
        mapped.reasons.append(_reason("properties.products", "must be an array of products"))
    for name in ("total", "revenue", "amount"):
        if props.get(name) is not None:
            out["amount"] = amount(props[name], f"properties.{name}", mapped.reasons)
            mapped.origins["properties.amount"] = f"properties.{name}"
            break
    else:
        if items:
            refunded = _net_total(items)
            if refunded is not None:
                out["amount"] = refunded
        mapped.origins["properties.amount"] = "properties.total"
    mapped.origins["properties.items"] = "properties.products"
    return out


def _product_viewed(props: dict[str, Any], mapped: MappedMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sku = props.get("sku")
    mapped.origins["properties.sku"] = "properties.sku"
    if sku is None and props.get("product_id") is not None:
        sku = props["product_id"]
        mapped.origins["properties.sku"] = "properties.product_id"
    if sku is not None:
        out["sku"] = _as_id(sku)
    for name in ("category", "name"):
        if props.get(name) is not None:
            out[name] = props[name]
    if props.get("price") is not None:
        out["price"] = amount(props["price"], "properties.price", mapped.reasons)
    return out


def _cart(props: dict[str, Any], mapped: MappedMessage) -> dict[str, Any]:
    products = props.get("products")
    if isinstance(products, list):
        items = _items(products, "properties.products", mapped.reasons)
        mapped.origins["properties.items"] = "properties.products"
    elif products is not None:
        mapped.reasons.append(_reason("properties.products", "must be an array of products"))
        items = []
    else:
        # Product Added names the one product added; the cart as far as this event tells.
        items = _items([props], "properties", mapped.reasons)
        mapped.origins["properties.items"] = "properties"
    out: dict[str, Any] = {"items": items}
    if props.get("total") is not None:
        out["total"] = amount(props["total"], "properties.total", mapped.reasons)
    else:
        total = _net_total(items) if items else "0.00"
        if total is not None:
            out["total"] = total
        mapped.origins["properties.total"] = "properties.products"
    return out


def _custom(name: Any, props: dict[str, Any], context: dict[str, Any], mapped: MappedMessage) -> dict[str, Any]:
    """Any other track: a custom event with its name, its properties and its context."""
    out = dict(props)
    if "name" in out:
        # `name` is the custom event's own name in the contract.
        out["property_name"] = out.pop("name")
    if context and "context" not in out:
        out["context"] = context
    out["name"] = name
    mapped.origins["properties.name"] = "event"
    mapped.origins["properties.property_name"] = "properties.name"
    return out


# E-commerce spec v2 event names; any other track is a custom event.
_ECOMMERCE: dict[str, tuple[str, Callable[[dict[str, Any], MappedMessage], dict[str, Any]]]] = {
    "Order Completed": ("purchase", _purchase),
    "Order Refunded": ("refund", _refund),
    "Product Viewed": ("product_viewed", _product_viewed),
    "Product Added": ("cart_updated", _cart),
    "Product Removed": ("cart_updated", _cart),
    "Cart Viewed": ("cart_updated", _cart),
}

# Traits of identify and the customer_updated fields they fill (the first one present wins).
_TRAITS = (
    ("email", ("email",)),
    ("phone", ("phone",)),
    ("first_name", ("firstName", "first_name")),
    ("last_name", ("lastName", "last_name")),
    ("gender", ("gender",)),
    ("consents", ("consents",)),
)


def _customer(traits: dict[str, Any], context: dict[str, Any], mapped: MappedMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def put(target: str, value: Any, origin: str) -> None:
        out[target] = value
        mapped.origins[f"properties.{target}"] = origin

    for target, names in _TRAITS:
        for name in names:
            if name in traits:
                put(target, traits[name], f"traits.{name}")
                break
    if "birthday" in traits:
        birthday = traits["birthday"]
        # A date, or a date-time of which the date is the birthday.
        if isinstance(birthday, str) and len(birthday) > 10 and birthday[10] in "T ":
            birthday = birthday[:10]
        put("birth_date", birthday, "traits.birthday")
    address = traits.get("address")
    if isinstance(address, dict) and "city" in address:
        put("city", address["city"], "traits.address.city")
    for target in ("timezone", "locale"):
        if target in traits:
            put(target, traits[target], f"traits.{target}")
        elif context.get(target) is not None:
            put(target, context[target], f"context.{target}")
    return out


def _site_visit(props: dict[str, Any], context: dict[str, Any], mapped: MappedMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    page: dict[str, Any] = context["page"] if isinstance(context.get("page"), dict) else {}
    campaign: dict[str, Any] = context["campaign"] if isinstance(context.get("campaign"), dict) else {}
    for target, candidates in (
        (
            "page",
            ((props, "url", "properties.url"), (page, "url", "context.page.url"), (props, "path", "properties.path")),
        ),
        ("referrer", ((props, "referrer", "properties.referrer"), (page, "referrer", "context.page.referrer"))),
        ("utm_source", ((campaign, "source", "context.campaign.source"),)),
        ("utm_campaign", ((campaign, "name", "context.campaign.name"),)),
    ):
        for container, key, origin in candidates:
            if container.get(key) is not None:
                out[target] = container[key]
                mapped.origins[f"properties.{target}"] = origin
                break
    return out


def _object(message: dict[str, Any], name: str, reasons: list[dict[str, Any]]) -> dict[str, Any]:
    value = message.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        reasons.append(_reason(name, "must be an object"))
        return {}
    return value


def message_id_of(message: dict[str, Any]) -> Any:
    """The message's idempotency key; without one, a digest of its content, so that a resent copy
    is still a duplicate."""
    value = message.get("messageId")
    if value is None:
        return "sha256-" + hashlib.sha256(orjson.dumps(message, option=orjson.OPT_SORT_KEYS)).hexdigest()[:40]
    return _as_id(value)


def map_message(
    message: dict[str, Any], *, call: str | None, batch_sent_at: Any, batch_context: Any, now: datetime
) -> MappedMessage:
    """Map one Segment message (of the route's `call`, or of its own `type` in a batch).

    Runs for every message of every batch: the common case (a track with a string messageId and
    a timestamp) takes no detour, and the context is only merged for the calls that read it."""
    get = message.get
    kind = call or get("type")
    event_name = get("event")
    if type(event_name) is not str:
        event_name = None
    reasons: list[dict[str, Any]] = []
    message_id = get("messageId")
    if type(message_id) is not str:
        message_id = message_id_of(message)
    mapped = MappedMessage(
        kind if isinstance(kind, str) else None, event_name, message_id if isinstance(message_id, str) else None
    )
    mapped.reasons = reasons
    if kind not in CALLS:
        reasons.append(_reason("type", f"must be one of {', '.join(CALLS)}"))
        return mapped
    raw_context = get("context")
    if raw_context is not None and type(raw_context) is not dict:
        reasons.append(_reason("context", "must be an object"))
        raw_context = None
    when = occurred_at(message, batch_sent_at=batch_sent_at, now=now, reasons=reasons)
    user_id = get("userId")
    if user_id is not None and type(user_id) is not str:
        user_id = _as_id(user_id)
    anonymous_id = get("anonymousId")
    if anonymous_id is not None and type(anonymous_id) is not str:
        anonymous_id = _as_id(anonymous_id)

    ecommerce = _ECOMMERCE.get(event_name) if kind == "track" and event_name is not None else None
    if ecommerce is not None and not (
        # Without the cart's products a removal cannot be told as the cart's content.
        event_name == "Product Removed" and not isinstance(_object(message, "properties", []).get("products"), list)
    ):
        event_type, props = ecommerce[0], ecommerce[1](_object(message, "properties", reasons), mapped)
    elif kind == "track":
        if not event_name:
            reasons.append(_reason("event", "a track call needs its event name"))
        context = _context(raw_context, batch_context)
        event_type, props = "custom", _custom(get("event"), _object(message, "properties", reasons), context, mapped)
    elif kind == "identify":
        context = _context(raw_context, batch_context)
        event_type, props = "customer_updated", _customer(_object(message, "traits", reasons), context, mapped)
    elif kind == "alias":
        # The previous id (an anonymous visitor's) is merged into the customer named by userId.
        if get("previousId") is None:
            reasons.append(_reason("previousId", "is required: an alias merges the previous id into userId"))
        event_type, props, anonymous_id = "customer_updated", {}, _as_id(get("previousId"))
        mapped.origins["anonymous_id"] = "previousId"
    elif kind == "page":
        context = _context(raw_context, batch_context)
        event_type, props = "site_visit", _site_visit(_object(message, "properties", reasons), context, mapped)
    elif kind == "screen":
        screen = get("name")
        if screen is None:
            screen = _object(message, "properties", reasons).get("name")
        event_type, props = "site_visit", ({} if screen is None else {"page": screen})
        mapped.origins["properties.page"] = "name"
    else:  # group
        event_type = "custom"
        props = {"name": "group", "group_id": _as_id(get("groupId"))}
        traits = _object(message, "traits", reasons)
        if traits:
            props["traits"] = traits
        mapped.origins["properties.group_id"] = "groupId"

    if not reasons:
        mapped.event = {
            "event_id": message_id,
            "type": event_type,
            "customer_id": user_id,
            "anonymous_id": anonymous_id,
            "occurred_at": when,
            "properties": props,
        }
    return mapped


def _context(context: dict[str, Any] | None, batch_context: Any) -> dict[str, Any]:
    """The message's context over the batch's (a message's own keys win)."""
    if isinstance(batch_context, dict) and batch_context:
        return {**batch_context, **(context or {})}
    return context or {}


# Where a contract field comes from unless the mapping recorded otherwise in `origins` (the
# common cases are kept out of the per-message work).
_ORIGINS = {
    "event_id": "messageId",
    "customer_id": "userId",
    "anonymous_id": "anonymousId",
    "occurred_at": "timestamp",
    "properties.items": "properties.products",
    "properties.coupon_code": "properties.coupon",
}


def segment_field(loc: list[Any], origins: dict[str, str]) -> str:
    """The Segment field behind a contract error location, e.g. properties.products[1].price."""
    if not loc:
        return "(message)"
    head = str(loc[0])
    if head != "properties" or len(loc) == 1:
        return origins.get(head) or _ORIGINS.get(head, head)
    key = str(loc[1])
    rest = loc[2:]
    base = origins.get(f"properties.{key}") or _ORIGINS.get(f"properties.{key}", f"properties.{key}")
    if key == "items" and rest:
        if base == "properties":  # the one product of a Product Added is the event's properties
            return f"properties.{_ITEM_FIELDS.get(str(rest[1]), rest[1])}" if len(rest) > 1 else "properties"
        path = f"{base}[{rest[0]}]"
        if len(rest) > 1:
            path += f".{_ITEM_FIELDS.get(str(rest[1]), rest[1])}"
        return path
    return base + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)


@dataclass(slots=True)
class SegmentOutcome:
    accepted: int
    duplicates: int
    rejected: int

    def as_dict(self) -> dict[str, Any]:
        return {"success": True, "accepted": self.accepted, "duplicates": self.duplicates, "rejected": self.rejected}


async def ingest_segment(
    *,
    session: AsyncSession,
    source: str,
    messages: list[Any],
    call: str | None,
    batch_sent_at: Any,
    batch_context: Any,
    max_message_bytes: int,
    now: datetime,
) -> SegmentOutcome:
    """Map the messages, accept the mapped events as POST /v1/events does, record the rejected ones."""
    try:
        # Parsed once for the whole batch; when it cannot be, each message reports it.
        batch_sent_at = parse_time(batch_sent_at) if batch_sent_at is not None else None
    except (ValueError, OverflowError):
        pass
    rejections: list[RejectionRow] = []
    mapped_list: list[tuple[MappedMessage, bytes]] = []
    events: list[dict[str, Any]] = []

    def reject(mapped: MappedMessage, reasons: list[dict[str, Any]], payload: bytes | None) -> None:
        rejections.append(
            RejectionRow(
                message_id=mapped.message_id,
                type=mapped.call[:32] if mapped.call else None,
                event=mapped.event_name[:256] if mapped.event_name else None,
                reasons=orjson.dumps(reasons),
                payload=payload,
            )
        )
        REJECTED.labels(source, mapped.call if mapped.call in CALLS else "unknown").inc()

    for message in messages:
        if not isinstance(message, dict):
            reject(MappedMessage(None, None, None), [_reason("(message)", "a message must be a JSON object")], None)
            continue
        payload = orjson.dumps(message)
        mapped = map_message(message, call=call, batch_sent_at=batch_sent_at, batch_context=batch_context, now=now)
        if len(payload) > max_message_bytes:
            limit = f"{max_message_bytes // 1024} KB ({max_message_bytes} bytes)"
            reject(
                mapped, [_reason("(message)", f"a message exceeds the limit of {limit}; it has {len(payload)}")], None
            )
        elif mapped.event is None:
            reject(mapped, mapped.reasons, payload)
        else:
            mapped_list.append((mapped, payload))
            events.append(mapped.event)
    outcome = await ingest_events(session=session, source=source, events=events, now=now)
    for (mapped, payload), result in zip(mapped_list, outcome.results, strict=True):
        if result["status"] == "rejected":
            reasons = [
                {"field": segment_field(e["loc"], mapped.origins), "msg": e["msg"], "loc": e["loc"]}
                for e in result["errors"]
            ]
            reject(mapped, reasons, payload)
    await RejectionRepository(session).add_many(source=source, api=API, received_at=now, rows=rejections)
    return SegmentOutcome(outcome.accepted, outcome.duplicates, len(rejections))
