"""HTTP routes of the notifier: thin, they validate, call the domain and shape the answer."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from crm_common.auth import CHANGES_NOTHING
from crm_common.contract.messages import MessageRequested
from crm_common.contract.types import Locale
from crm_common.errors import InvalidInput, PayloadTooLarge
from crm_common.http import PathId, read_limited_body
from notifier import templates as template_ops
from notifier.consumers import after_commit
from notifier.contacts import contact_view
from notifier.deps import NotifierDep, RuntimeDep, SessionDep
from notifier.errors import (
    ContactNotFound,
    IdempotencyConflict,
    MessageNotFound,
    UnknownProvider,
)
from notifier.messages import accept_requests
from notifier.repository import NotifierRepository
from notifier.schemas import (
    AttemptRead,
    CallbackIn,
    CallbackRead,
    CampaignMessages,
    ChannelCostReport,
    ChannelCostRow,
    ContactRead,
    EventRead,
    Key,
    MessageCount,
    MessageCreate,
    MessageDetail,
    MessagePage,
    MessageRead,
    PreviewRead,
    PreviewRequest,
    ProviderStatus,
    TemplateCreate,
    TemplatePage,
    TemplateRead,
    TemplateUpdate,
)
from notifier.tokens import verify_callback
from notifier.tracking import (
    apply_callback,
    check_unsubscribe,
    perform_unsubscribe,
    record_click,
    record_open,
)

# `router` is behind the ops API key (CRM_API_KEYS); `public` is not, so every route on it must
# authenticate its caller itself: an HMAC signature (provider callbacks) or a signed token (links).
router = APIRouter(prefix="/v1", tags=["notifier"])
public = APIRouter(prefix="/v1", tags=["links and callbacks"])

Token = Annotated[str, Path(min_length=1, max_length=4096)]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000)]
MAX_CALLBACK_BYTES = 64_000
PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


# -- templates ---------------------------------------------------------------------------------


@router.post(
    "/templates",
    status_code=201,
    response_model=TemplateRead,
    summary="Create a template (its variables are checked)",
)
async def create_template(data: TemplateCreate, session: SessionDep, runtime: RuntimeDep) -> TemplateRead:
    template = await template_ops.create_template(repo=NotifierRepository(session), data=data, now=runtime.clock.now())
    return TemplateRead.model_validate(template)


@router.get("/templates", response_model=TemplatePage, summary="List templates")
async def list_templates(
    session: SessionDep,
    key: Key | None = None,
    channel: Annotated[str | None, Query(pattern="^(email|sms|push)$")] = None,
    locale: Locale | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> TemplatePage:
    items, total = await NotifierRepository(session).list_templates(
        key=key, channel=channel, locale=locale, limit=limit, offset=offset
    )
    return TemplatePage(items=[TemplateRead.model_validate(t) for t in items], total=total)


@router.get("/templates/{template_id}", response_model=TemplateRead, summary="Read a template")
async def read_template(template_id: PathId, session: SessionDep) -> TemplateRead:
    return TemplateRead.model_validate(
        await template_ops.get_template(repo=NotifierRepository(session), template_id=template_id)
    )


@router.put("/templates/{template_id}", response_model=TemplateRead, summary="Replace a template's content")
async def update_template(
    template_id: PathId, data: TemplateUpdate, session: SessionDep, runtime: RuntimeDep
) -> TemplateRead:
    template = await template_ops.update_template(
        repo=NotifierRepository(session),
        template_id=template_id,
        data=data,
        now=runtime.clock.now(),
    )
    return TemplateRead.model_validate(template)


@router.delete("/templates/{template_id}", status_code=204, summary="Delete a template")
async def delete_template(template_id: PathId, session: SessionDep) -> Response:
    await template_ops.delete_template(repo=NotifierRepository(session), template_id=template_id)
    return Response(status_code=204)


@router.post(
    "/templates/{template_id}/preview",
    response_model=PreviewRead,
    summary="Render a template with sample or given values",
    **CHANGES_NOTHING,
)
async def preview_template(
    template_id: PathId, data: PreviewRequest, session: SessionDep, notifier: NotifierDep
) -> PreviewRead:
    template = await template_ops.get_template(repo=NotifierRepository(session), template_id=template_id)
    url = notifier.links.unsubscribe_url("preview", "preview", template.channel)
    rendered = await template_ops.preview(
        renderer=notifier.renderer,
        template=template,
        variables=data.variables,
        first_name=data.first_name,
        unsubscribe_url=url,
        budget_ms=notifier.settings.render_timeout_ms,
    )
    return PreviewRead(subject=rendered.subject, body=rendered.body, html=rendered.html)


# -- customers and messages --------------------------------------------------------------------


@router.get(
    "/customers/{customer_id}/contact",
    response_model=ContactRead,
    summary="A customer's contact data and consents",
)
async def read_contact(customer_id: PathId, session: SessionDep) -> ContactRead:
    contact = await NotifierRepository(session).get_contact(customer_id)
    if contact is None:
        raise ContactNotFound("no contact data for this customer")
    return ContactRead.model_validate(contact_view(contact))


@router.get(
    "/customers/{customer_id}/messages",
    response_model=MessagePage,
    summary="A customer's message history, newest first",
)
async def customer_messages(
    customer_id: PathId, session: SessionDep, limit: Limit = 50, offset: Offset = 0
) -> MessagePage:
    items, total = await NotifierRepository(session).history(customer_id, limit=limit, offset=offset)
    return MessagePage(items=[MessageRead.model_validate(m) for m in items], total=total)


@router.get(
    "/messages/{message_id}",
    response_model=MessageDetail,
    summary="One message with its attempts and delivery events",
)
async def read_message(message_id: PathId, session: SessionDep) -> MessageDetail:
    repo = NotifierRepository(session)
    message = await repo.get_message(message_id)
    if message is None:
        raise MessageNotFound("no such message")
    detail = MessageDetail.model_validate(message)
    detail.delivery_attempts = [AttemptRead.model_validate(a) for a in await repo.attempts_of(message.id)]
    detail.events = [EventRead.model_validate(e) for e in await repo.events_of(message.id)]
    return detail


@router.post(
    "/messages",
    status_code=202,
    response_model=MessageRead,
    summary="Send a message now (ops); idempotent by id",
)
async def send_message(
    data: MessageCreate, session: SessionDep, runtime: RuntimeDep, notifier: NotifierDep
) -> MessageRead:
    request = MessageRequested(
        id=data.id or f"ops:{uuid.uuid4().hex}",
        customer_id=data.customer_id,
        occurred_at=runtime.clock.now(),
        kind=data.kind,
        template=data.template,
        channel=data.channel,
        locale=data.locale,
        variables=data.variables,
        campaign_id=data.campaign_id,
        offer_id=data.offer_id,
        not_before=data.not_before,
        expires_at=data.expires_at,
        source_service="ops",
    )
    if data.id is not None:
        earlier = await NotifierRepository(session).get_message(data.id)
        if earlier is not None:
            # A retry answers the message it made; the same id for another message is a client bug.
            differing = _differing_fields(earlier, request)
            if differing:
                raise IdempotencyConflict(
                    f"message {data.id!r} exists with a different request",
                    details={"id": data.id, "fields": differing},
                )
            return MessageRead.model_validate(earlier)
    due = await accept_requests(session=session, requests=[request], now=runtime.clock.now(), policy=notifier.policy)
    if due:
        after_commit(session, notifier.dispatcher.wake)
    message = await NotifierRepository(session).get_message(request.id)
    assert message is not None
    return MessageRead.model_validate(message)


def _differing_fields(message: Any, request: MessageRequested) -> list[str]:
    pairs = {
        "customer_id": (message.customer_id, request.customer_id),
        "kind": (message.kind, request.kind),
        "template": (message.template, request.template),
        "channel": (message.requested_channel, request.channel),
        "locale": (message.locale, request.locale),
        "variables": (message.variables or {}, request.variables or {}),
        "campaign_id": (message.campaign_id, request.campaign_id),
        "offer_id": (message.offer_id, request.offer_id),
        "not_before": (message.not_before, request.not_before),
        "expires_at": (message.expires_at, request.expires_at),
        "source": (message.source_service, request.source_service),
    }
    return [name for name, (stored, asked) in pairs.items() if stored != asked]


@router.get(
    "/campaigns/{campaign_id}/messages",
    response_model=CampaignMessages,
    summary="A campaign's messages counted by channel, state and the reason of each suppression",
)
async def campaign_messages(campaign_id: PathId, session: SessionDep) -> CampaignMessages:
    counts = [
        MessageCount(channel=c, state=st, reason=why, messages=n)
        for c, st, why, n in await NotifierRepository(session).campaign_counts(campaign_id)
    ]
    return CampaignMessages(campaign_id=campaign_id, total=sum(x.messages for x in counts), counts=counts)


# -- providers ---------------------------------------------------------------------------------


@router.get(
    "/providers",
    response_model=list[ProviderStatus],
    summary="Provider health, breaker state, rate limit and waiting messages",
)
async def providers_status(session: SessionDep, notifier: NotifierDep) -> list[ProviderStatus]:
    waiting = await NotifierRepository(session).open_counts()
    out = []
    for status in notifier.providers.status():
        status["waiting"] = {state: n for (channel, state), n in waiting.items() if channel == status["channel"]}
        out.append(ProviderStatus.model_validate(status))
    return out


@router.get(
    "/reports/channels",
    response_model=ChannelCostReport,
    summary="Messages sent and their cost by month and channel (what the providers charge)",
)
async def channel_cost_report(session: SessionDep) -> ChannelCostReport:
    rows = [ChannelCostRow.model_validate(r) for r in await NotifierRepository(session).channel_costs()]
    by_channel: dict[str, Decimal] = {}
    for row in rows:
        by_channel[row.channel] = by_channel.get(row.channel, Decimal(0)) + row.cost
    return ChannelCostReport(rows=rows, by_channel=by_channel, total=sum(by_channel.values(), Decimal(0)))


@public.post(
    "/providers/{provider}/callbacks",
    response_model=CallbackRead,
    summary="Delivery report from a provider (HMAC-SHA256 of the body in X-Signature)",
    responses={401: {"description": "no signature"}, 403: {"description": "bad signature"}},
)
async def provider_callback(
    provider: Annotated[str, Path(max_length=16)],
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    notifier: NotifierDep,
    x_signature: Annotated[str | None, Header(max_length=200)] = None,
) -> CallbackRead:
    secret = {
        "email": notifier.settings.email_callback_secret,
        "sms": notifier.settings.sms_callback_secret,
        "push": notifier.settings.push_callback_secret,
    }.get(provider)
    if secret is None:
        raise UnknownProvider(f"no provider {provider!r}")
    # The route is public: a body from an unsigned sender is never buffered past the limit.
    body = await read_limited_body(
        request,
        MAX_CALLBACK_BYTES,
        error_factory=lambda limit: PayloadTooLarge(
            f"a callback body is at most {limit} bytes", details={"max_bytes": limit}
        ),
    )
    verify_callback(secret, body, x_signature)
    try:
        data = CallbackIn.model_validate(orjson.loads(body))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        details = (
            [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        raise InvalidInput("invalid callback body", details=details) from None
    result = await apply_callback(session=session, provider=provider, body=data.model_dump(), now=runtime.clock.now())
    return CallbackRead.model_validate(result)


# -- links in messages ---------------------------------------------------------------------------


@public.get("/t/o/{token}", summary="Open pixel", response_class=Response)
async def open_pixel(token: Token, session: SessionDep, runtime: RuntimeDep, notifier: NotifierDep) -> Response:
    await record_open(session=session, signer=notifier.signer, token=token, now=runtime.clock.now())
    return Response(PIXEL, media_type="image/gif", headers={"Cache-Control": "no-store"})


@public.get("/t/c/{token}", summary="Click redirect", status_code=302, response_class=RedirectResponse)
async def click(token: Token, session: SessionDep, runtime: RuntimeDep, notifier: NotifierDep) -> RedirectResponse:
    url = await record_click(session=session, signer=notifier.signer, token=token, now=runtime.clock.now())
    return RedirectResponse(url, status_code=302)


@public.get(
    "/unsubscribe/{token}",
    response_class=HTMLResponse,
    summary="Unsubscribe page (the POST performs it)",
)
async def unsubscribe_page(token: Token, notifier: NotifierDep) -> HTMLResponse:
    # GET never changes state: mail scanners follow links (RFC 8058 section 3).
    payload = check_unsubscribe(signer=notifier.signer, token=token)
    html = (
        "<!doctype html><html><body><h1>Unsubscribe</h1>"
        f"<p>Stop receiving marketing messages by {payload['ch']}?</p>"
        '<form method="post"><button type="submit">Unsubscribe</button></form></body></html>'
    )
    return HTMLResponse(html)


@public.post("/unsubscribe/{token}", response_class=HTMLResponse, summary="One-click unsubscribe (RFC 8058)")
async def unsubscribe_now(
    token: Token, session: SessionDep, runtime: RuntimeDep, notifier: NotifierDep
) -> HTMLResponse:
    result = await perform_unsubscribe(session=session, signer=notifier.signer, token=token, now=runtime.clock.now())
    return HTMLResponse(
        f"<!doctype html><html><body><p>You are unsubscribed from {result['channel']} messages.</p></body></html>"
    )
