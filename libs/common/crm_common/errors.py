"""The JSON error shape every service answers with, and the base of business errors."""

from __future__ import annotations

import logging
import sys
from typing import Any, TypeVar

from asyncpg.exceptions import DataError, InvalidTextRepresentationError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class CRMError(Exception):
    """A business error that carries its HTTP status and a stable code."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, details: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class NotFound(CRMError):
    status_code = 404
    code = "not_found"


class Conflict(CRMError):
    status_code = 409
    code = "conflict"


class Unauthorized(CRMError):
    status_code = 401
    code = "unauthorized"


class Forbidden(CRMError):
    status_code = 403
    code = "forbidden"


class PayloadTooLarge(CRMError):
    status_code = 413
    code = "payload_too_large"


class RateLimited(CRMError):
    status_code = 429
    code = "rate_limited"


class Unavailable(CRMError):
    status_code = 503
    code = "unavailable"


class InvalidInput(CRMError):
    status_code = 422
    code = "validation_error"


E = TypeVar("E", bound=CRMError)


def coded(base: type[E], code: str, doc: str | None = None) -> type[E]:
    """A business error class that is `base` with its own stable code, declared in one line:
    `AccountNotFound = coded(NotFound, "account_not_found")` is a class named AccountNotFound."""
    name = "".join(part.title() for part in code.split("_"))
    module = sys._getframe(1).f_globals.get("__name__", __name__)
    return type(name, (base,), {"code": code, "__doc__": doc, "__module__": module})


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def _clean_errors(errors: list[Any]) -> list[dict[str, Any]]:
    """Reduce pydantic errors to loc/msg/type; inputs are dropped so a bad byte never echoes."""
    out = []
    for e in errors:
        out.append({"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")})
    return out


# SQLSTATE classes and codes of a dependency at fault rather than the statement: connection
# failures (08), refused logins (28), a database that is gone (3D), out of resources (53), shut
# down or not accepting connections (57), and retryable conflicts (serialization failure,
# deadlock, lock not available, object not in prerequisite state).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "28", "3D", "53", "57"})
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "55000"})


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)


def is_transient(exc: BaseException) -> bool:
    """True for a failure of a dependency (database, broker, network) rather than of the work itself.

    The one classification of the runtime: the consume loop retries such a batch instead of
    dead-lettering it, workers back off, and the HTTP layer answers 503 with Retry-After.
    """
    import asyncpg
    from aiokafka.errors import KafkaError
    from sqlalchemy.exc import InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        state = _sqlstate(exc)
        return bool(state and (state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES))
    if isinstance(exc, asyncpg.exceptions.PostgresConnectionError | asyncpg.exceptions.InterfaceError):
        return True
    if isinstance(exc, asyncpg.exceptions.CannotConnectNowError | asyncpg.exceptions.AdminShutdownError):
        return True
    return isinstance(exc, OSError | ConnectionError | TimeoutError | KafkaError)


def unencodable_text(exc: BaseException) -> bool:
    """True when `exc` is the refusal of text that is not valid Unicode on its way out of the
    process: a lone surrogate, which JSON can carry as a `\\ud800` escape but UTF-8 cannot encode
    (the database driver's codec, or orjson serialising it for a JSONB column or a message), or
    PostgreSQL's JSON parser refusing the `\ud800` escape itself."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # The codec's UnicodeEncodeError, asyncpg's DataError quoting it, orjson's TypeError.
        if isinstance(current, TypeError | ValueError | DataError) and "surrogates not allowed" in str(current):
            return True
        # asyncpg's InvalidTextRepresentationError (22P02): "Unicode low surrogate must follow a high surrogate".
        if isinstance(current, InvalidTextRepresentationError) and "surrogate" in str(current):
            return True
        current = current.__cause__ or current.__context__ or getattr(current, "orig", None)
    return False


def install_error_handlers(app: FastAPI) -> None:
    """Render every error as JSON; unexpected ones as a 500 without a stack trace."""

    async def _driver_refused(_: Request, exc: Exception) -> ORJSONResponse:
        # Raised before the statement ran (or before the message was queued): the transaction rolls back.
        if _sqlstate(exc) == "22021":  # character_not_in_repertoire: a NUL in text a route let through
            return ORJSONResponse(
                error_body("invalid_text", "text must not contain NUL characters (\\u0000)"), status_code=422
            )
        if unencodable_text(exc):
            return ORJSONResponse(
                error_body(
                    "invalid_text",
                    "text must be valid Unicode: lone surrogates (\\ud800-\\udfff escapes) are not allowed",
                ),
                status_code=422,
            )
        raise exc  # a database that is down becomes a 503 in the middleware, anything else a 500

    app.add_exception_handler(DBAPIError, _driver_refused)
    app.add_exception_handler(DataError, _driver_refused)
    app.add_exception_handler(TypeError, _driver_refused)

    @app.exception_handler(CRMError)
    async def _crm(_: Request, exc: CRMError) -> ORJSONResponse:
        return ORJSONResponse(
            error_body(exc.code, exc.message, exc.details), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> ORJSONResponse:
        details = _clean_errors(list(exc.errors()))
        return ORJSONResponse(
            {
                "detail": details,
                "error": {"code": "validation_error", "message": "invalid request", "details": details},
            },
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> ORJSONResponse:
        code = {
            404: "not_found",
            405: "method_not_allowed",
            401: "unauthorized",
            403: "forbidden",
            413: "payload_too_large",
        }.get(exc.status_code, "http_error")
        return ORJSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> ORJSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return ORJSONResponse(error_body("internal_error", "internal error"), status_code=500)
