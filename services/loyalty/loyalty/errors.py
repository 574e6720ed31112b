"""Business errors of the loyalty service; each carries its HTTP status."""

from __future__ import annotations

from crm_common.errors import Conflict, InvalidInput, NotFound, coded

AccountNotFound = coded(NotFound, "account_not_found")
RedemptionNotFound = coded(NotFound, "redemption_not_found")
InsufficientPoints = coded(Conflict, "insufficient_points")
IdempotencyConflict = coded(Conflict, "idempotency_conflict", "The same idempotency key came with another body.")
RedemptionNotCancellable = coded(Conflict, "redemption_not_cancellable")
InvalidProgramme = coded(InvalidInput, "invalid_programme")
