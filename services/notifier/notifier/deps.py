"""Dependencies of the notifier's routes as Annotated aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from crm_common.service import RuntimeDep, SessionDep
from notifier.dispatcher import Dispatcher
from notifier.policy import Policy
from notifier.providers import Providers
from notifier.rendering import Renderer
from notifier.settings import Settings
from notifier.tokens import TokenSigner
from notifier.tracking import Links


@dataclass
class Notifier:
    """What the notifier process holds besides the shared runtime; made in the lifespan."""

    settings: Settings
    policy: Policy
    renderer: Renderer
    signer: TokenSigner
    links: Links
    providers: Providers
    dispatcher: Dispatcher


def get_notifier(request: Request) -> Notifier:
    return request.app.state.notifier  # type: ignore[no-any-return]


NotifierDep = Annotated[Notifier, Depends(get_notifier)]

__all__ = ["Notifier", "NotifierDep", "RuntimeDep", "SessionDep"]
