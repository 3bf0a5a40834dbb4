"""Request dependencies: the runtime, and who is calling (bearer token → Principal)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.problems import ApiProblem
from app.domain.organizations import Principal
from app.runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="An organization, auditor or admin token")


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain `def` dependency in a worker thread, a
    # thread hop on every request.
    return runtime_of(request)


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiProblem(401, "missing_token", "send an API token as 'Authorization: Bearer …'",
                         challenge)
    principal = await runtime_of(request).principal_for(credentials.credentials)
    if principal is None:
        raise ApiProblem(401, "invalid_token", "the API token is unknown or revoked", challenge)
    return principal


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
