"""Segmentation and the notifier over HTTP: segment keys, template channels, profiles."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from offers.errors import PeerUnavailable
from offers.settings import Settings


def first_plain_key(api_keys: str) -> str | None:
    """The first key of CRM_API_KEYS that is a key rather than a sha256: digest of one."""
    for key in (k.strip() for k in api_keys.split(",")):
        if key and not key.startswith("sha256:"):
            return key
    return None


class Peers:
    """Calls to the services that own segments, profiles and templates (timeouts; no answer is a 503)."""

    def __init__(self, http: httpx.AsyncClient, settings: Settings) -> None:
        self.http = http
        self.segmentation = settings.segmentation_url.rstrip("/")
        self.notifier = settings.notifier_url.rstrip("/")
        self.timeout = httpx.Timeout(settings.peer_timeout_s, connect=min(settings.peer_timeout_s, 2.0))
        key = first_plain_key(settings.api_keys.get_secret_value())
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def _get(self, peer: str, url: str, params: dict[str, Any] | None = None) -> httpx.Response:
        try:
            response = await self.http.get(url, params=params, headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise PeerUnavailable(peer, type(exc).__name__) from exc
        if response.status_code >= 500 or response.status_code in (401, 403, 429):
            raise PeerUnavailable(peer, f"HTTP {response.status_code}")
        return response

    async def segment_exists(self, key: str) -> bool:
        r = await self._get("segmentation", f"{self.segmentation}/v1/segments/{quote(key, safe='')}")
        return r.status_code == 200

    async def template_channels(self, key: str) -> set[str]:
        r = await self._get("notifier", f"{self.notifier}/v1/templates", {"key": key, "limit": 100})
        if r.status_code == 422:
            # The notifier refuses it as a template key (NUL, blank, too long): no template has it.
            return set()
        if r.status_code != 200:
            raise PeerUnavailable("notifier", f"HTTP {r.status_code}")
        return {t["channel"] for t in r.json().get("items", []) if t.get("key") == key}

    async def profile(self, customer_id: str) -> dict[str, Any] | None:
        r = await self._get("segmentation", f"{self.segmentation}/v1/profiles/{quote(customer_id, safe='')}")
        if r.status_code in (404, 422):  # 422: not a possible customer id, so no profile
            return None
        if r.status_code != 200:
            raise PeerUnavailable("segmentation", f"HTTP {r.status_code}")
        return r.json()  # type: ignore[no-any-return]


def digest_of_profile(profile: dict[str, Any]) -> dict[str, Any]:
    """The same fields as segmentation's ProfileDigest, from its full profile answer."""
    traits = profile.get("traits") or {}
    digest = {
        "first_name": traits.get("first_name"),
        "favourite_product": profile.get("favourite_product"),
        "favourite_category": profile.get("favourite_category"),
        "favourite_size": profile.get("favourite_size"),
        "favourite_color": profile.get("favourite_color"),
        "predicted_next_purchase": profile.get("predicted_next_purchase"),
        "value_tier": profile.get("value_tier"),
        "lifecycle": profile.get("lifecycle"),
        "orders": profile.get("orders"),
        "revenue": profile.get("revenue"),
        "avg_check": profile.get("avg_check"),
        "discount_affinity": profile.get("discount_affinity"),
        "last_feedback_rating": profile.get("last_feedback_rating"),
        "last_feedback_topic": profile.get("last_feedback_topic"),
        "consents": profile.get("consents"),
    }
    return {k: v for k, v in digest.items() if v is not None}
