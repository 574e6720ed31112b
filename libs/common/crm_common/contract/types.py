"""Constrained field types shared by the contract: safe strings, money, bounded free JSON."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints


def _no_nul(value: str) -> str:
    # PostgreSQL text and JSONB cannot hold U+0000; refuse it at the edge instead of failing later.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _identifier(value: str) -> str:
    # An id of only spaces would name a customer, order or event nobody can tell from another.
    _no_nul(value)
    if value.isspace():
        raise ValueError("must not be blank")
    return value


Id = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_identifier)]
ShortText = Annotated[str, StringConstraints(max_length=256), AfterValidator(_no_nul)]
LongText = Annotated[str, StringConstraints(max_length=5000), AfterValidator(_no_nul)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(_identifier)]

# ASCII digits only: Python's \d (and Decimal()) would also read "٣" as 3.
_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
PLAIN_DECIMAL_ERROR = 'must be a plain decimal such as "12.50" (no spaces, "_", "+", exponent, NaN or Infinity)'


def _plain_decimal(value: Any) -> Any:
    # Decimal() also reads "1_000", " 10 ", "+5", "1e3" and "Infinity"; a POS that sends such a
    # string has a formatting bug, and guessing what it meant would book the wrong amount. JSON
    # numbers pass: the contract has always taken them (integers, and decimals read as they print).
    if isinstance(value, str) and not _PLAIN_DECIMAL.fullmatch(value):
        raise ValueError(PLAIN_DECIMAL_ERROR)
    return value


PlainDecimal = BeforeValidator(_plain_decimal)
_DECIMAL_DOC = 'a decimal: a string such as "12.50" (preferred) or a JSON number'

MAX_AMOUNT = Decimal("1000000000000")
Money = Annotated[
    Decimal,
    Field(ge=0, le=MAX_AMOUNT, max_digits=18, decimal_places=4, allow_inf_nan=False, description=_DECIMAL_DOC),
    PlainDecimal,
]
SignedMoney = Annotated[
    Decimal,
    Field(
        ge=-MAX_AMOUNT, le=MAX_AMOUNT, max_digits=18, decimal_places=4, allow_inf_nan=False, description=_DECIMAL_DOC
    ),
    PlainDecimal,
]
Quantity = Annotated[
    Decimal,
    Field(gt=0, le=Decimal(1_000_000), max_digits=14, decimal_places=4, allow_inf_nan=False, description=_DECIMAL_DOC),
    PlainDecimal,
]
Points = Annotated[
    Decimal,
    Field(ge=0, le=MAX_AMOUNT, max_digits=18, decimal_places=2, allow_inf_nan=False, description=_DECIMAL_DOC),
    PlainDecimal,
]

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_EMAIL = re.compile(r"^[^@\s\x00]{1,64}@[^@\s\x00]{1,253}\.[^@\s\x00.]{2,63}$")
_LOCALE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8}){0,3}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


def _phone(value: str) -> str:
    if not _E164.match(value):
        raise ValueError("must be an E.164 phone number such as +14155550123")
    return value


def _email(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError("must be an e-mail address")
    return value.strip()


def _timezone(value: str) -> str:
    try:
        if not value or ".." in value or value.startswith("/"):
            raise ValueError
        ZoneInfo(value)
    except Exception:
        raise ValueError("must be an IANA time zone such as Europe/Berlin") from None
    return value


def _locale(value: str) -> str:
    if not _LOCALE.match(value):
        raise ValueError("must be a locale such as en or pt-BR")
    return value


def _currency(value: str) -> str:
    if not _CURRENCY.match(value):
        raise ValueError("must be an ISO 4217 code such as EUR")
    return value


Phone = Annotated[str, StringConstraints(max_length=16), AfterValidator(_phone)]
Email = Annotated[str, StringConstraints(max_length=320), AfterValidator(_no_nul), AfterValidator(_email)]
TimeZoneName = Annotated[str, StringConstraints(max_length=64), AfterValidator(_timezone)]
Locale = Annotated[str, StringConstraints(max_length=35), AfterValidator(_locale)]
Currency = Annotated[str, StringConstraints(min_length=3, max_length=3), AfterValidator(_currency)]

MAX_JSON_DEPTH = 8
MAX_JSON_NODES = 2000
MAX_JSON_INT = 2**53


def check_free_json(value: Any, *, depth: int = 0, budget: list[int] | None = None) -> Any:
    """Validate free-form JSON: bounded depth and size, no NUL, finite numbers within 2**53."""
    budget = budget if budget is not None else [MAX_JSON_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"too large: at most {MAX_JSON_NODES} values")
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested too deeply: at most {MAX_JSON_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or len(k) > 128 or "\x00" in k:
                raise ValueError("keys must be strings of at most 128 characters without NUL")
            check_free_json(v, depth=depth + 1, budget=budget)
    elif isinstance(value, list):
        for v in value:
            check_free_json(v, depth=depth + 1, budget=budget)
    elif isinstance(value, str):
        if "\x00" in value:
            raise ValueError("strings must not contain NUL characters")
        if len(value) > 10_000:
            raise ValueError("strings must be at most 10000 characters")
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            raise ValueError("integers must be within +/-2**53")
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > 1e300:
            raise ValueError("numbers must be finite")
    else:
        raise ValueError(f"unsupported JSON value {type(value).__name__}")
    return value


FreeJson = Annotated[dict[str, Any], AfterValidator(check_free_json)]
