"""Template management: create, replace, delete, preview; each save checks its variables."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from crm_common.errors import Conflict
from notifier.errors import TemplateNotFound
from notifier.models import Template
from notifier.rendering import Rendered, Renderer, check_template
from notifier.repository import NotifierRepository
from notifier.schemas import TemplateCreate, TemplateUpdate


async def create_template(*, repo: NotifierRepository, data: TemplateCreate, now: datetime) -> Template:
    """Save a new template; 422 when it uses an undeclared variable, 409 when the slot is taken."""
    check_template(
        channel=data.channel,
        subject=data.subject,
        body=data.body,
        html=data.html,
        variables=data.variables,
    )
    if await repo.find_template(data.key, data.channel, data.locale) is not None:
        raise Conflict(
            "a template for this key, channel and locale exists",
            details={"key": data.key, "channel": data.channel, "locale": data.locale},
        )
    template = Template(
        id=uuid.uuid4().hex,
        key=data.key,
        channel=data.channel,
        locale=data.locale,
        subject=data.subject,
        body=data.body,
        html=data.html,
        variables=list(dict.fromkeys(data.variables)),
        sample=data.sample,
        version=1,
        created_at=now,
        updated_at=now,
    )
    repo.add(template)
    try:
        await repo.flush()
    except IntegrityError:
        raise Conflict("a template for this key, channel and locale exists") from None
    return template


async def get_template(*, repo: NotifierRepository, template_id: str) -> Template:
    template = await repo.get_template(template_id)
    if template is None:
        raise TemplateNotFound(f"no template {template_id!r}")
    return template


async def update_template(
    *, repo: NotifierRepository, template_id: str, data: TemplateUpdate, now: datetime
) -> Template:
    """Replace a template's content; checked like a new one, its version goes up."""
    template = await get_template(repo=repo, template_id=template_id)
    check_template(
        channel=template.channel,
        subject=data.subject,
        body=data.body,
        html=data.html,
        variables=data.variables,
    )
    template.subject, template.body, template.html = data.subject, data.body, data.html
    template.variables = list(dict.fromkeys(data.variables))
    template.sample = data.sample
    template.version += 1
    template.updated_at = now
    await repo.flush()
    return template


async def delete_template(*, repo: NotifierRepository, template_id: str) -> None:
    await repo.delete_template(await get_template(repo=repo, template_id=template_id))
    await repo.flush()


async def preview(
    *,
    renderer: Renderer,
    template: Template,
    variables: dict[str, Any] | None,
    first_name: str | None,
    unsubscribe_url: str,
    budget_ms: float,
) -> Rendered:
    """Render with the given values, or the template's sample, as a customer would receive it.

    Off the event loop and within the same budget as a send: 422 render_timeout past it.
    """
    implicit = {
        "customer": {
            "customer_id": "preview",
            "first_name": first_name or "Alex",
            "last_name": None,
            "locale": template.locale,
        },
        "message_id": "preview",
        "unsubscribe_url": unsubscribe_url,
    }
    values = variables if variables is not None else dict(template.sample or {})
    return await renderer.render_async(template, values, implicit, budget_ms=budget_ms)
