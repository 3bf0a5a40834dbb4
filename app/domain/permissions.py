"""Who may process and who may download an asset.

A permission is public or lists the authorized organizations; the owner is always
authorized and every id must be a registered organization. Permissions are fixed when the
asset (or the task producing it) is registered and never change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from typing import Any

from app.domain.errors import InvalidCommand


@dataclasses.dataclass(frozen=True)
class Permission:
    public: bool
    authorized_ids: tuple[str, ...]

    def allows(self, org: str) -> bool:
        return self.public or org in self.authorized_ids

    def to_json(self) -> dict[str, Any]:
        return {"public": self.public, "authorized_ids": list(self.authorized_ids)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Permission:
        return cls(public=bool(value["public"]), authorized_ids=tuple(value["authorized_ids"]))

    @classmethod
    def private_to(cls, org: str) -> Permission:
        return cls(public=False, authorized_ids=(org,))

    @classmethod
    def everyone(cls) -> Permission:
        return cls(public=True, authorized_ids=())


@dataclasses.dataclass(frozen=True)
class Permissions:
    process: Permission
    download: Permission

    def to_json(self) -> dict[str, Any]:
        return {"process": self.process.to_json(), "download": self.download.to_json()}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Permissions:
        return cls(
            process=Permission.from_json(value["process"]),
            download=Permission.from_json(value["download"]),
        )


def permission(
    public: bool, authorized_ids: Iterable[str], owner: str, known_orgs: Collection[str]
) -> Permission:
    """Build a permission as requested: owner added, ids checked, order stable."""
    ids = list(dict.fromkeys(authorized_ids))
    unknown = [org for org in ids if org not in known_orgs]
    if unknown:
        raise InvalidCommand(
            f"unknown organization(s) in authorized_ids: {', '.join(sorted(unknown))}",
            code="unknown_org",
        )
    if owner not in ids:
        ids.insert(0, owner)
    return Permission(public=public, authorized_ids=tuple(ids))


def permissions(
    process: tuple[bool, Iterable[str]],
    download: tuple[bool, Iterable[str]] | None,
    owner: str,
    known_orgs: Collection[str],
) -> Permissions:
    """Process and download permissions; download defaults to the process permission."""
    proc = permission(process[0], process[1], owner, known_orgs)
    down = proc if download is None else permission(download[0], download[1], owner, known_orgs)
    return Permissions(process=proc, download=down)
