"""Business errors of the notifier; each carries its HTTP status."""

from __future__ import annotations

from crm_common.errors import Conflict, CRMError, Forbidden, InvalidInput, NotFound, Unauthorized, coded

TemplateInvalid = coded(InvalidInput, "template_invalid")
TemplateNotFound = coded(NotFound, "template_not_found")
MessageNotFound = coded(NotFound, "message_not_found")
ContactNotFound = coded(NotFound, "contact_not_found")


class RenderFailed(InvalidInput):
    code = "render_failed"

    @property
    def reason(self) -> str:
        """The failed message's reason: the code, then what went wrong."""
        return f"{self.code}: {self.message}"[:1000]


class RenderTimeout(RenderFailed):
    """A render ran past its time budget (a template looping or recursing without end)."""

    code = "render_timeout"

    @property
    def reason(self) -> str:
        return self.code


BadToken = coded(Forbidden, "bad_token")
MissingSignature = coded(Unauthorized, "missing_signature")
BadSignature = coded(Forbidden, "bad_signature")
UnknownProvider = coded(NotFound, "unknown_provider")
IdempotencyConflict = coded(Conflict, "idempotency_conflict")

__all__ = [
    "BadSignature",
    "BadToken",
    "CRMError",
    "ContactNotFound",
    "IdempotencyConflict",
    "MessageNotFound",
    "MissingSignature",
    "RenderFailed",
    "RenderTimeout",
    "TemplateInvalid",
    "TemplateNotFound",
    "UnknownProvider",
]
