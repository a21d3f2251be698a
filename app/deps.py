"""Annotated dependencies: routes reach the app's heavy state only through these."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import NotReady
from app.search import SearchService
from app.settings import Settings


def get_service(request: Request) -> SearchService:
    service: SearchService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the model and index are still loading")
    return service


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServiceDep = Annotated[SearchService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
