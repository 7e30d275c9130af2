"""Bearer-token auth (DESIGN.md 4): constant-time comparison, tokens never logged."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from service.api.deps import Services, ServicesDep
from service.api.errors import ServiceError


def token_matches(presented: str, accepted: list[SecretStr]) -> bool:
    """Constant-time comparison against every accepted token (no early exit on a match)."""
    matched = False
    for token in accepted:
        matched |= hmac.compare_digest(presented.encode(), token.get_secret_value().encode())
    return matched


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_token(request: Request, services: ServicesDep) -> None:
    """Guards the scoring API when ``CRS_API_TOKENS`` is set."""
    check_api_token(request, services)


def check_api_token(request: Request, services: Services) -> None:
    """401 unless the request bears one of ``CRS_API_TOKENS`` (when any is set). The scoring
    routes call it themselves: a FastAPI dependency costs the event loop more per request."""
    accepted = services.settings.api_tokens
    if not accepted:
        return
    presented = bearer_token(request)
    if presented is None or not token_matches(presented, accepted):
        reason = "missing bearer token" if presented is None else "invalid bearer token"
        raise ServiceError(401, reason, headers={"WWW-Authenticate": "Bearer"})


async def require_admin_token(request: Request, services: ServicesDep) -> None:
    """Guards ``/admin/*`` (mounted only when ``CRS_ADMIN_TOKEN`` is set); API tokens do not
    open it."""
    admin = services.settings.admin_token
    presented = bearer_token(request)
    if admin is None or presented is None or not token_matches(presented, [admin]):
        reason = "missing bearer token" if presented is None else "invalid admin token"
        raise ServiceError(401, reason, headers={"WWW-Authenticate": "Bearer"})
