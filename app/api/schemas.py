"""Pydantic models of the HTTP edge (requests refuse unknown fields)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrganizationIn(Strict):
    id: str = Field(min_length=1, max_length=40, examples=["org-a"])
    name: str = Field(min_length=1, max_length=200, examples=["Hospital A"])
    model_export_enabled: bool = False


class Organization(BaseModel):
    id: str
    name: str
    model_export_enabled: bool
    created_at: dt.datetime


class TokenIn(Strict):
    role: Literal["org", "auditor"] = "org"
    org: str | None = Field(default=None, description="The organization, for role 'org'")
    name: str = Field(default="", max_length=100)


class TokenInfo(BaseModel):
    id: str
    org: str | None
    role: str
    name: str
    issued_at: dt.datetime
    issued_by: str
    revoked_at: dt.datetime | None


class IssuedToken(BaseModel):
    """The token in clear: shown once, in this response only."""

    token: str
    info: TokenInfo


class OrganizationCreated(BaseModel):
    organization: Organization
    token: IssuedToken


class Me(BaseModel):
    kind: str
    org: str | None
    token_id: str | None
