"""Business errors of the notifier; each carries its HTTP status."""

from __future__ import annotations

from crm_common.errors import Conflict, CRMError, Forbidden, InvalidInput, NotFound, Unauthorized


class TemplateInvalid(InvalidInput):
    code = "template_invalid"


class TemplateNotFound(NotFound):
    code = "template_not_found"


class MessageNotFound(NotFound):
    code = "message_not_found"


class ContactNotFound(NotFound):
    code = "contact_not_found"


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


class BadToken(Forbidden):
    code = "bad_token"


class MissingSignature(Unauthorized):
    code = "missing_signature"


class BadSignature(Forbidden):
    code = "bad_signature"


class UnknownProvider(NotFound):
    code = "unknown_provider"


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


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
