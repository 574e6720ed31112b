"""Masking of e-mail addresses and phone numbers in the answers of a key without the `pii` scope.

One place for every service instead of a masked variant of each schema: the answers that carry
contact data (the notifier's contacts, segmentation's profile traits, message variables, DLQ
entries) have them under free-form keys too, so the masking walks the JSON answer itself. A
value is masked when its key names an e-mail address or a phone number, and any string that is
an e-mail address is masked wherever it appears. Answers to keys with `pii` pass untouched, at
no cost.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

EMAIL_RE = re.compile(r"([A-Za-z0-9._%+\-]+)@([A-Za-z0-9.\-]+\.[A-Za-z]{2,})")
PHONE_KEYS = ("phone", "mobile", "msisdn", "sms_number")


def mask_email(address: str) -> str:
    """`john@example.com` -> `j***@example.com`: the domain stays, so an operator can still tell providers apart."""
    return EMAIL_RE.sub(lambda m: f"{m.group(1)[:1]}***@{m.group(2)}", address)


def mask_phone(number: str) -> str:
    """`+447700900123` -> `+44********23`: the country code and the last two digits stay."""
    digits = [i for i, ch in enumerate(number) if ch.isdigit()]
    if len(digits) < 5:  # not a phone number (a key named `mobile_app` holding "ios")
        return number
    keep = set(digits[:2] + digits[-2:])
    return "".join(ch if (i in keep or not ch.isdigit()) else "*" for i, ch in enumerate(number))


def _names_phone(key: str) -> bool:
    name = key.lower()
    return any(k in name for k in PHONE_KEYS)


def mask(value: Any, phone: bool = False) -> Any:
    """A copy of a JSON value with contact data masked (`phone`: the enclosing key names a phone number)."""
    if isinstance(value, dict):
        return {k: mask(v, isinstance(k, str) and _names_phone(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, phone) for v in value]
    if isinstance(value, str):
        if phone:
            return mask_phone(value)
        return mask_email(value) if "@" in value else value
    return value


class PiiMaskMiddleware:
    """Mask the JSON answer of a request whose key lacks `pii` (the key check sets `state.mask_pii`).

    Pure ASGI: the flag is set by the route's dependency before the answer starts, so the start
    message is held only for those requests, the body collected, masked and sent with its new length.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The request state lives in the scope; make sure the route sees this very dict.
        state: dict[str, Any] = scope.setdefault("state", {})
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def _send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if state.get("mask_pii") and headers.get(b"content-type", b"").startswith(b"application/json"):
                    held["start"] = message
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                await _send_masked(held.pop("start"), b"".join(chunks))
                return
            await send(message)

        async def _send_masked(start: dict[str, Any], body: bytes) -> None:
            try:
                body = orjson.dumps(mask(orjson.loads(body)))
            except orjson.JSONDecodeError:
                pass
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, _send)
