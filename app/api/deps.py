"""Request dependencies: the runtime, and who is calling (bearer token → Principal)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.problems import ApiProblem
from app.domain.organizations import Principal
from app.runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="An organization, auditor or admin token")


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiProblem(401, "missing_token", "send an API token as 'Authorization: Bearer …'",
                         challenge)
    principal = await get_runtime(request).principal_for(credentials.credentials)
    if principal is None:
        raise ApiProblem(401, "invalid_token", "the API token is unknown or revoked", challenge)
    return principal


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
