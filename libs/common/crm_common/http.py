"""HTTP plumbing every service shares: the path id type and the request body limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Path, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from crm_common.contract.types import Id
from crm_common.errors import PayloadTooLarge

# An id in a path: 1-128 characters, not blank, without NUL, the rule of the ids a service stores
# (`Id` of the contract). Anything else can never name a stored thing, so it is a 422 naming the
# parameter (`{"loc": ["path", "customer_id"], ...}`) before any query runs. Query parameters
# that are ids use `Id` itself: `cursor: Id | None = None`.
PathId = Annotated[Id, Path(description="an id: 1-128 characters, not blank, without NUL")]


def declared_over(content_length: str | bytes | None, limit: int) -> bool:
    """True when a Content-Length header announces more than `limit` bytes.

    A value that is not a number announces nothing: the body is then counted as it streams in.
    """
    return content_length is not None and content_length.isdigit() and int(content_length) > limit


def _too_large(limit: int) -> Exception:
    return PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes", details={"max_bytes": limit})


async def read_limited_body(
    request: Request, limit: int, *, error_factory: Callable[[int], Exception] = _too_large
) -> bytes:
    """The body, refused by Content-Length at once or as soon as it streams past `limit` bytes.

    `error_factory(limit)` makes the refusal (by default a 413 `payload_too_large`); nothing is
    buffered beyond the limit, so a route may read a body from a sender it has not yet verified.
    """
    if declared_over(request.headers.get("content-length"), limit):
        raise error_factory(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise error_factory(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class BodyLimitMiddleware:
    """Refuse a request body over `limit` bytes: by Content-Length at once, else as it streams in.

    The refusal is an HTTPException raised from `receive`, so the route that reads the body stops
    there and the JSON error handler answers 413 (nothing is buffered beyond the limit).
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.message = f"the request body exceeds the limit of {limit} bytes"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = declared_over(dict(scope["headers"]).get(b"content-length"), self.limit)
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            if too_large:
                raise StarletteHTTPException(413, self.message)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise StarletteHTTPException(413, self.message)
            return message  # type: ignore[no-any-return]

        await self.app(scope, limited, send)
