"""Streaming a stored artifact to the client, whatever the store behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from app.domain.errors import NotFound
from app.storage.artifacts import ArtifactStore


async def file_response(store: ArtifactStore, sha256: str, filename: str) -> StreamingResponse:
    """Open first, so a missing file is a clean 404 rather than a broken stream."""
    if not await store.exists(sha256):
        raise NotFound(f"the file {sha256} is no longer stored", code="file_gone")
    reader = await store.open(sha256)

    async def chunks() -> AsyncIterator[bytes]:
        async with reader:
            async for chunk in reader:
                yield chunk

    return StreamingResponse(
        chunks(), media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{filename}"',
                 "Content-Length": str(reader.size), "X-Content-SHA256": sha256},
    )
