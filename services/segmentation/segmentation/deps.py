"""Request dependencies of the segmentation API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from crm_common.service import RuntimeDep, ServiceRuntime, SessionDep
from segmentation.settings import Settings


def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings  # type: ignore[return-value]


SettingsDep = Annotated[Settings, Depends(get_settings)]

__all__ = ["RuntimeDep", "ServiceRuntime", "SessionDep", "SettingsDep"]
