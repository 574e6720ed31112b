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


class CouponNotFound(NotFound):
    code = "unknown_code"

    def __init__(self, code: str) -> None:
        super().__init__(f"no coupon {code!r}", details={"reason": "unknown_code", "code": code})


class CouponRefused(Conflict):
    """A coupon that cannot be redeemed for this basket: `code` is the reason (expired, used, ...)."""

    def __init__(self, reason: str, message: str, code: str) -> None:
        super().__init__(message, details={"reason": reason, "code": code})
        self.code = reason


class RedemptionNotFound(NotFound):
    code = "redemption_not_found"

    def __init__(self, code: str, order_id: str) -> None:
        super().__init__(
            f"coupon {code!r} was not redeemed for order {order_id!r}", details={"code": code, "order_id": order_id}
        )
