"""The JSON error shape every service answers with, and the base of business errors."""

from __future__ import annotations

import logging
from typing import Any

from asyncpg.exceptions import DataError
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


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def _clean_errors(errors: list[Any]) -> list[dict[str, Any]]:
    """Reduce pydantic errors to loc/msg/type; inputs are dropped so a bad byte never echoes."""
    out = []
    for e in errors:
        out.append({"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")})
    return out


def dependency_down(exc: BaseException) -> bool:
    import asyncpg

    from crm_common.consumer import is_transient

    if isinstance(exc, asyncpg.exceptions.PostgresConnectionError | asyncpg.exceptions.InterfaceError):
        return True
    if isinstance(exc, asyncpg.exceptions.CannotConnectNowError | asyncpg.exceptions.AdminShutdownError):
        return True
    return is_transient(exc)


def unencodable_text(exc: BaseException) -> bool:
    """True when `exc` is the refusal of text that is not valid Unicode on its way out of the
    process: a lone surrogate, which JSON can carry as a `\\ud800` escape but UTF-8 cannot encode
    (the database driver's codec, or orjson serialising it for a JSONB column or a message)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # The codec's UnicodeEncodeError, asyncpg's DataError quoting it, orjson's TypeError.
        if isinstance(current, TypeError | ValueError | DataError) and "surrogates not allowed" in str(current):
            return True
        current = current.__cause__ or current.__context__ or getattr(current, "orig", None)
    return False


def install_error_handlers(app: FastAPI) -> None:
    """Render every error as JSON; unexpected ones as a 500 without a stack trace."""

    async def _driver_refused(_: Request, exc: Exception) -> ORJSONResponse:
        # Raised before the statement ran (or before the message was queued): the transaction rolls back.
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
