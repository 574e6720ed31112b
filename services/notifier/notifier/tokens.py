"""Signed tokens for tracking and unsubscribe links; HMAC checks of provider callbacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import orjson

from notifier.errors import BadSignature, BadToken, MissingSignature

MAX_TOKEN_LEN = 4096


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Sign a small JSON payload for one purpose; verification refuses any change to it."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def _mac(self, purpose: str, body: str) -> bytes:
        # The purpose is part of the MAC so an open token can never be replayed as an unsubscribe.
        return hmac.new(self._key, f"{purpose}.{body}".encode(), hashlib.sha256).digest()

    def sign(self, purpose: str, payload: dict[str, Any]) -> str:
        body = _b64(orjson.dumps(payload))
        return f"{body}.{_b64(self._mac(purpose, body))}"

    def verify(self, purpose: str, token: str) -> dict[str, Any]:
        """Return the payload of a valid token; raise BadToken for anything else."""
        if not token or len(token) > MAX_TOKEN_LEN or token.count(".") != 1:
            raise BadToken("invalid or tampered link")
        body, mac = token.split(".")
        try:
            given = _unb64(mac)
            if not hmac.compare_digest(given, self._mac(purpose, body)):
                raise BadToken("invalid or tampered link")
            payload = orjson.loads(_unb64(body))
        except BadToken:
            raise
        except Exception:
            raise BadToken("invalid or tampered link") from None
        if not isinstance(payload, dict):
            raise BadToken("invalid or tampered link")
        return payload


def callback_signature(secret: str, body: bytes) -> str:
    """The signature a provider puts in `X-Signature` for a callback body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_callback(secret: str, body: bytes, header: str | None) -> None:
    """Refuse a callback without a signature (401) or with a wrong one (403)."""
    if not header:
        raise MissingSignature("X-Signature header required")
    expected = callback_signature(secret, body)
    if not hmac.compare_digest(header.strip().encode(errors="replace"), expected.encode()):
        raise BadSignature("signature does not match the body")
