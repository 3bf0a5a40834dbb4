"""Checksums of data samples, which are registered by location and SHA-256 and never
uploaded: the client computes it at registration, the runner checks it before each use."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_checksum(path: Path) -> str:
    """SHA-256 of a data sample: of the file's bytes, or for a folder, of the sorted lines
    `<relative path>\\0<sha256 of the file>\\n` of every file under it."""
    if path.is_file():
        return file_sha256(path)
    lines = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        lines.append(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()
