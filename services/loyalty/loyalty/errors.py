"""Business errors of the loyalty service; each carries its HTTP status."""

from __future__ import annotations

from crm_common.errors import Conflict, InvalidInput, NotFound


class AccountNotFound(NotFound):
    code = "account_not_found"


class RedemptionNotFound(NotFound):
    code = "redemption_not_found"


class InsufficientPoints(Conflict):
    code = "insufficient_points"


class IdempotencyConflict(Conflict):
    """The same idempotency key was used with a different request body."""

    code = "idempotency_conflict"


class RedemptionNotCancellable(Conflict):
    code = "redemption_not_cancellable"


class InvalidProgramme(InvalidInput):
    code = "invalid_programme"
