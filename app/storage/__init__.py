"""File storage: the content-addressed artifact store and safe archive handling.

`artifacts` stores bytes by SHA-256 behind the `ArtifactStore` interface (filesystem now,
S3-compatible later); `archives` unpacks uploaded tar/zip archives safely and writes zips
for downloads. The errors here are plain exceptions with a stable `code`; the HTTP layer
maps them (TooLarge → 413, ChecksumMismatch / InvalidChecksum / UnsafeArchive → 400,
ArtifactNotFound → 404).
"""

from app.storage.archives import (
    DEFAULT_LIMITS,
    ArchiveLimits,
    ArchiveSummary,
    UnsafeArchive,
    ZipSummary,
    has_root_dockerfile,
    has_root_dockerfile_async,
    inspect_archive,
    inspect_archive_async,
    unpack_archive,
    unpack_archive_async,
    zip_directory,
    zip_directory_async,
    zip_files,
    zip_files_async,
)
from app.storage.artifacts import (
    ArtifactNotFound,
    ArtifactReader,
    ArtifactStore,
    ChecksumMismatch,
    FilesystemArtifactStore,
    InvalidChecksum,
    StorageError,
    StoredArtifact,
    TooLarge,
    artifact_key,
    normalize_sha256,
)

__all__ = [
    "DEFAULT_LIMITS",
    "ArchiveLimits",
    "ArchiveSummary",
    "ArtifactNotFound",
    "ArtifactReader",
    "ArtifactStore",
    "ChecksumMismatch",
    "FilesystemArtifactStore",
    "InvalidChecksum",
    "StorageError",
    "StoredArtifact",
    "TooLarge",
    "UnsafeArchive",
    "ZipSummary",
    "artifact_key",
    "has_root_dockerfile",
    "has_root_dockerfile_async",
    "inspect_archive",
    "inspect_archive_async",
    "normalize_sha256",
    "unpack_archive",
    "unpack_archive_async",
    "zip_directory",
    "zip_directory_async",
    "zip_files",
    "zip_files_async",
]
