"""Signed links (open pixel, click redirect, one-click unsubscribe) and provider callbacks."""

from __future__ import annotations

import re
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.ext.asyncio import AsyncSession

from notifier.contacts import unsubscribe
from notifier.deliveries import delivery_event, emit
from notifier.errors import BadToken, MessageNotFound
from notifier.models import Message
from notifier.repository import NotifierRepository
from notifier.tokens import TokenSigner

OPEN, CLICK, UNSUBSCRIBE = "open", "click", "unsubscribe"
_HREF = re.compile(r"""href\s*=\s*(["'])(https?://[^"'<>\s]+)\1""", re.IGNORECASE)


class Links:
    """Build the signed URLs a message carries."""

    def __init__(self, base_url: str, signer: TokenSigner) -> None:
        self.base = base_url.rstrip("/")
        self.signer = signer

    def unsubscribe_url(self, message_id: str, customer_id: str, channel: str) -> str:
        token = self.signer.sign(UNSUBSCRIBE, {"m": message_id, "c": customer_id, "ch": channel})
        return f"{self.base}/v1/unsubscribe/{token}"

    def open_url(self, message_id: str) -> str:
        return f"{self.base}/v1/t/o/{self.signer.sign(OPEN, {'m': message_id})}"

    def click_url(self, message_id: str, url: str) -> str:
        return f"{self.base}/v1/t/c/{self.signer.sign(CLICK, {'m': message_id, 'u': url})}"

    def instrument_html(self, html: str, message_id: str) -> str:
        """Route every http(s) link through the click redirect and add the open pixel."""
        unsubscribe_prefix = f"{self.base}/v1/unsubscribe/"

        def _swap(m: re.Match[str]) -> str:
            url = m.group(2).replace("&amp;", "&")
            if url.startswith(unsubscribe_prefix):
                return m.group(0)
            return f"href={m.group(1)}{escape(self.click_url(message_id, url))}{m.group(1)}"

        out = _HREF.sub(_swap, html)
        src = escape(self.open_url(message_id))
        pixel = f'<img src="{src}" width="1" height="1" alt="" style="display:none">'
        idx = out.lower().rfind("</body>")
        return out[:idx] + pixel + out[idx:] if idx >= 0 else out + pixel


def _safe_redirect(url: Any) -> str:
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or len(url) > 2048:
        raise BadToken("invalid or tampered link")
    return url


async def _message(repo: NotifierRepository, payload: dict[str, Any]) -> Message:
    message_id = payload.get("m")
    if not isinstance(message_id, str):
        raise BadToken("invalid or tampered link")
    message = await repo.get_message(message_id)
    if message is None:
        raise MessageNotFound("unknown message")
    return message


async def record_open(*, session: AsyncSession, signer: TokenSigner, token: str, now: datetime) -> None:
    """Record the first open of a message (later opens are repeats of the same event)."""
    message = await _message(NotifierRepository(session), signer.verify(OPEN, token))
    await emit(session, [delivery_event(message=message, status="opened", at=now)])


async def record_click(*, session: AsyncSession, signer: TokenSigner, token: str, now: datetime) -> str:
    """Record a click and return where to send the reader."""
    payload = signer.verify(CLICK, token)
    url = _safe_redirect(payload.get("u"))
    message = await _message(NotifierRepository(session), payload)
    await emit(session, [delivery_event(message=message, status="clicked", at=now, url=url)])
    return url


def check_unsubscribe(*, signer: TokenSigner, token: str) -> dict[str, Any]:
    payload = signer.verify(UNSUBSCRIBE, token)
    if not isinstance(payload.get("c"), str) or payload.get("ch") not in ("email", "sms", "push"):
        raise BadToken("invalid or tampered link")
    return payload


async def perform_unsubscribe(
    *, session: AsyncSession, signer: TokenSigner, token: str, now: datetime
) -> dict[str, Any]:
    """Withdraw the consent the link was sent under (RFC 8058 one-click) and record it."""
    payload = check_unsubscribe(signer=signer, token=token)
    repo = NotifierRepository(session)
    await unsubscribe(repo=repo, customer_id=payload["c"], channel=payload["ch"], now=now)
    message = await repo.get_message(str(payload.get("m")))
    if message is not None:
        await emit(
            session,
            [delivery_event(message=message, status="unsubscribed", at=now, channel=payload["ch"])],
        )
    return {"customer_id": payload["c"], "channel": payload["ch"], "unsubscribed": True}


async def apply_callback(
    *, session: AsyncSession, provider: str, body: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """Apply a provider's delivery report: sent -> delivered, or a bounce -> failed."""
    repo = NotifierRepository(session)
    message: Message | None = None
    if body.get("message_id"):
        message = await repo.get_message(body["message_id"], for_update=True)
    elif body.get("provider_message_id"):
        message = await repo.message_by_provider_id(provider, body["provider_message_id"])
    if message is None or message.provider not in (None, provider):
        raise MessageNotFound("no message of this provider with that id")
    status = body["status"]
    changed = False
    if status == "delivered" and message.state == "sent":
        message.state, message.delivered_at, changed = "delivered", now, True
    elif status == "failed" and message.state in ("sent", "delivered"):
        message.state, message.reason, changed = (
            "failed",
            f"bounced: {body.get('reason') or 'unknown'}"[:1000],
            True,
        )
    if changed:
        message.updated_at = now
        await repo.flush()
        await emit(
            session,
            [delivery_event(message=message, status=status, at=now, reason=body.get("reason"))],
        )
    return {"message_id": message.id, "state": message.state, "applied": changed}
