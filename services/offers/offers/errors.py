"""Business errors of the offers service; each carries its HTTP status."""

from __future__ import annotations

from typing import Any

from crm_common.errors import Conflict, InvalidInput, NotFound, Unavailable


class CampaignNotFound(NotFound):
    code = "campaign_not_found"


class InvalidCampaign(InvalidInput):
    """A definition that can never work: the message and `details.errors` name each field."""

    code = "invalid_campaign"

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{where}: {first['msg']}{more}", details={"errors": errors})


class InvalidTransition(Conflict):
    code = "invalid_transition"


class PeerUnavailable(Unavailable, ConnectionError):
    """Segmentation or the notifier did not answer: retry later (a ConnectionError, so the consume
    loop treats it as transient and retries the batch instead of skipping it)."""

    code = "peer_unavailable"

    def __init__(self, peer: str, detail: str) -> None:
        super().__init__(
            f"{peer} is unreachable ({detail}); nothing was saved, retry later",
            details={"peer": peer},
            headers={"Retry-After": "5"},
        )


class PurchasesBehind(ConnectionError):
    """Segmentation has seen purchases this service has not applied yet: retry the batch shortly
    (transient), so a favourite product is not read before the purchases that make it."""
