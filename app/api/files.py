"""Streaming a stored artifact to the client, whatever the store behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from app.domain.errors import NotFound
from app.storage.artifacts import ArtifactStore


class Download(StreamingResponse):
    """A stored file's bytes, as the OpenAPI document describes them."""

    media_type = "application/octet-stream"


class ZipDownload(StreamingResponse):
    media_type = "application/zip"


def binary(description: str, media_type: str = "application/octet-stream"
           ) -> dict[int | str, dict[str, object]]:
    """`responses=` for a download route: its 200 is bytes, not JSON."""
    return {200: {"description": description, "content": {
        media_type: {"schema": {"type": "string", "format": "binary"}}}}}


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
