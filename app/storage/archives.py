"""Safe handling of uploaded archives (tar, tar.gz/bz2/xz, zip) and zipping of trees.

Owns the rules an archive must pass before any of it reaches a disk, the same for every
format (every refusal is an `UnsafeArchive` naming the member and the reason):

- member names are relative: no absolute path, no `..` component, no NUL or backslash;
- no member sits below a symlink (nothing is ever written through a link), and no two
  members share a name (directories excepted);
- symlinks are relative and stay inside the tree: resolved component by component from
  where they sit, they never climb above the root and never pass through another symlink
  (so their meaning cannot depend on other links); hard links name an earlier regular file
  of the same archive;
- only regular files, directories and those links: devices, fifos, sockets refused;
- at most `max_members` members and `max_total_bytes` unpacked bytes, counted both from
  the headers (before anything is read) and from the bytes actually decompressed; tar
  header blocks (pax, GNU long names) larger than 1 MiB are refused, so a compressed
  header bomb cannot fill the memory.

Members are streamed (never a whole archive or member in memory). `unpack_archive` works
in a fresh temporary directory next to the target and renames it into place only when
everything passed, so a refused archive leaves the target as it was. `inspect_archive`
applies every rule without writing anything (and tells whether a `Dockerfile` sits at the
root). `zip_directory` and `zip_files` write a zip to a file or stream, for downloads.
The functions are synchronous; the `*_async` variants run them in a worker thread.
"""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import dataclasses
import errno
import gzip
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import IO, BinaryIO, Literal, Protocol, cast

from app.storage.artifacts import StorageError

CHUNK_SIZE = 1024 * 1024
HEADER_BUDGET = 1024 * 1024  # largest tar header block (pax records, GNU long name)
MAX_LINK_TARGET = 4096
DOCKERFILE = "Dockerfile"

Parts = tuple[str, ...]
Kind = Literal["file", "directory", "symlink", "hardlink"]


class UnsafeArchive(StorageError):
    """The archive is refused: unsafe, over a limit, corrupt, or not an archive (HTTP 400)."""

    code = "unsafe_archive"

    def __init__(self, reason: str, *, member: str | None = None) -> None:
        message = f"archive member {member!r}: {reason}" if member is not None else reason
        super().__init__(message)
        self.reason = reason
        self.member = member


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    max_total_bytes: int = 2 * 1024**3
    max_members: int = 100_000


DEFAULT_LIMITS = ArchiveLimits()


@dataclasses.dataclass(frozen=True)
class ArchiveSummary:
    format: str  # "zip", "tar", "tar.gz", "tar.bz2", "tar.xz"
    members: int
    files: int
    directories: int
    symlinks: int
    hardlinks: int
    total_bytes: int
    has_root_dockerfile: bool


@dataclasses.dataclass(frozen=True)
class ZipSummary:
    files: int
    directories: int
    total_bytes: int
    # Paths (relative to the source) left out: special files, symlinks to directories or
    # leaving the source, unreadable entries.
    skipped: tuple[str, ...] = ()


# -- public API -----------------------------------------------------------------------


def inspect_archive(
    archive: Path | str, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> ArchiveSummary:
    """Apply every rule to the archive without writing anything; UnsafeArchive if refused."""
    return _scan(Path(archive), limits, None)


def has_root_dockerfile(archive: Path | str, *, limits: ArchiveLimits = DEFAULT_LIMITS) -> bool:
    """Whether a regular file `Dockerfile` sits at the archive's root (`Dockerfile` or
    `./Dockerfile`). The whole archive is checked on the way: UnsafeArchive if refused."""
    return inspect_archive(archive, limits=limits).has_root_dockerfile


def unpack_archive(
    archive: Path | str, target: Path | str, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> ArchiveSummary:
    """Unpack into `target`, which must not exist or be an empty directory (else
    FileExistsError). On UnsafeArchive (or any error) the target is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _require_free(target)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".unpacking", dir=target.parent)
    )
    try:
        summary = _scan(Path(archive), limits, _DiskSink(staging))
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, target)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise FileExistsError(
                    errno.EEXIST, "unpack target is not free", str(target)
                ) from exc
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def zip_directory(
    source: Path | str, destination: Path | str | BinaryIO, *, compress: bool = True
) -> ZipSummary:
    """Zip the tree under `source` (names relative to it). Symlinks are never followed out
    of the tree: a link to a file inside it is stored as a copy of that file, anything else
    that is not a regular file or directory is skipped and listed in the summary."""
    root = Path(source)
    real_root = root.resolve(strict=True)
    if not real_root.is_dir():
        raise NotADirectoryError(str(root))
    entries: list[tuple[str, Path | None]] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        relative_dir = here.relative_to(root)
        for name in list(dirnames):
            path = here / name
            if path.is_symlink():
                dirnames.remove(name)
                skipped.append((relative_dir / name).as_posix())
            else:
                entries.append(((relative_dir / name).as_posix() + "/", None))
        for name in sorted(filenames):
            path = here / name
            relative = (relative_dir / name).as_posix()
            if _regular_file_inside(path, real_root):
                entries.append((relative, path))
            else:
                skipped.append(relative)
    files, directories, total = _write_zip(entries, destination, compress)
    return ZipSummary(
        files=files, directories=directories, total_bytes=total, skipped=tuple(skipped)
    )


def zip_files(
    entries: Iterable[tuple[str, Path]],
    destination: Path | str | BinaryIO,
    *,
    compress: bool = True,
) -> ZipSummary:
    """Zip the given files under the given names (e.g. a dataset's files from the artifact
    store). Names must be relative without `..` and unique (ValueError otherwise)."""
    seen: set[Parts] = set()
    checked: list[tuple[str, Path | None]] = []
    for name, path in entries:
        try:
            parts = _split_name(name)
        except _Refused as exc:
            raise ValueError(f"bad zip entry name {name!r}: {exc.reason}") from None
        if not parts or parts in seen:
            raise ValueError(f"bad zip entry name {name!r}: empty or duplicate")
        seen.add(parts)
        checked.append(("/".join(parts), path))
    files, directories, total = _write_zip(checked, destination, compress)
    return ZipSummary(files=files, directories=directories, total_bytes=total)


async def inspect_archive_async(
    archive: Path | str, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> ArchiveSummary:
    return await asyncio.to_thread(inspect_archive, archive, limits=limits)


async def has_root_dockerfile_async(
    archive: Path | str, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> bool:
    return await asyncio.to_thread(has_root_dockerfile, archive, limits=limits)


async def unpack_archive_async(
    archive: Path | str, target: Path | str, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> ArchiveSummary:
    return await asyncio.to_thread(unpack_archive, archive, target, limits=limits)


async def zip_directory_async(
    source: Path | str, destination: Path | str | BinaryIO, *, compress: bool = True
) -> ZipSummary:
    return await asyncio.to_thread(zip_directory, source, destination, compress=compress)


async def zip_files_async(
    entries: Iterable[tuple[str, Path]],
    destination: Path | str | BinaryIO,
    *,
    compress: bool = True,
) -> ZipSummary:
    items = list(entries)
    return await asyncio.to_thread(zip_files, items, destination, compress=compress)


# -- reading archives: one member stream for every format ----------------------------


class _Refused(Exception):
    """Internal: a rule refused the current member (turned into UnsafeArchive)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Corrupt(Exception):
    """Internal: the compressed stream or container could not be read."""


@dataclasses.dataclass
class _Member:
    name: str
    kind: Kind
    size: int  # declared unpacked size (regular files)
    mode: int
    link: str | None = None  # symlink target, or hard-link target member name
    open: Callable[[], IO[bytes]] | None = None  # regular files: their content
    refused: str | None = None  # a member type that is never allowed, and why


def _detect(path: Path) -> str:
    with path.open("rb") as file:
        head = file.read(6)
    if not head:
        raise UnsafeArchive("the file is empty, not an archive")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if head[:3] == b"BZh":
        return "tar.bz2"
    if head == b"\xfd7zXZ\x00":
        return "tar.xz"
    return "tar"


class _BudgetedStream:
    """The decompressed tar stream, refusing to deliver more than the caller allows.

    tarfile reads pax and GNU long-name blocks whole, in memory; the allowance set before
    each header is what keeps a compressed header bomb from exhausting the memory.
    """

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self.consumed = 0
        self.limit = 0
        self.reading_header = True

    def allow(self, count: int, *, header: bool) -> None:
        self.limit = self.consumed + count
        self.reading_header = header

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > CHUNK_SIZE:
            size = CHUNK_SIZE
        try:
            data = self._source.read(size)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise _Corrupt(f"cannot decompress: {exc}") from None
        self.consumed += len(data)
        if self.consumed > self.limit:
            if self.reading_header:
                raise _Refused(f"a tar header block is larger than {HEADER_BUDGET} bytes")
            raise _Refused("member data is longer than its header says")
        return data


def _tar_members(path: Path, fmt: str) -> Generator[_Member, None, None]:
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(path.open("rb"))
        source = _decompressed(raw, fmt)
        stack.callback(source.close)
        stream = _BudgetedStream(source)
        stream.allow(HEADER_BUDGET, header=True)
        try:
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|"))  # type: ignore[call-overload]
        except tarfile.ReadError as exc:
            raise _Corrupt(f"not a tar or zip archive ({exc})") from None
        while True:
            stream.allow(HEADER_BUDGET, header=True)
            info = tar.next()
            if info is None:
                return
            yield _tar_member(tar, info, stream)


def _decompressed(raw: IO[bytes], fmt: str) -> IO[bytes]:
    if fmt == "tar.gz":
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if fmt == "tar.bz2":
        return cast(IO[bytes], bz2.BZ2File(raw, mode="rb"))
    if fmt == "tar.xz":
        return cast(IO[bytes], lzma.LZMAFile(raw, mode="rb"))
    return raw


def _tar_member(tar: tarfile.TarFile, info: tarfile.TarInfo, stream: _BudgetedStream) -> _Member:
    if info.isreg():
        stream.allow(_tar_blocks(info.size) + HEADER_BUDGET, header=False)

        def opener() -> IO[bytes]:
            data = tar.extractfile(info)
            if data is None:  # pragma: no cover - isreg() members always have data
                raise _Corrupt("no data for a regular file")
            return data

        return _Member(info.name, "file", info.size, info.mode, open=opener)
    if info.isdir():
        return _Member(info.name, "directory", 0, info.mode)
    if info.issym():
        return _Member(info.name, "symlink", 0, info.mode, link=info.linkname)
    if info.islnk():
        return _Member(info.name, "hardlink", 0, info.mode, link=info.linkname)
    reason = _TAR_TYPE_NAMES.get(info.type, f"unsupported member type {info.type!r}")
    return _Member(info.name, "file", 0, info.mode, refused=reason)


_TAR_TYPE_NAMES = {
    tarfile.CHRTYPE: "character device files are not allowed",
    tarfile.BLKTYPE: "block device files are not allowed",
    tarfile.FIFOTYPE: "fifos are not allowed",
}


def _tar_blocks(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _zip_members(path: Path, limits: ArchiveLimits) -> Generator[_Member, None, None]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise _Corrupt(f"not a valid zip archive ({exc})") from None
    with archive:
        infos = archive.infolist()
        # Refuse from the central directory before anything is decompressed.
        if len(infos) > limits.max_members:
            raise UnsafeArchive(
                f"the archive has {len(infos)} members, more than the limit of {limits.max_members}"
            )
        declared = sum(info.file_size for info in infos)
        if declared > limits.max_total_bytes:
            raise UnsafeArchive(
                f"the archive declares {declared} unpacked bytes, more than the limit of "
                f"{limits.max_total_bytes}"
            )
        for info in infos:
            yield _zip_member(archive, info)


def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    mode = info.external_attr >> 16 if info.create_system == 3 else 0
    file_type = stat.S_IFMT(mode)
    if info.flag_bits & 0x1:
        return _Member(
            info.filename, "file", 0, mode, refused="encrypted members are not supported"
        )
    if file_type == stat.S_IFLNK:
        with archive.open(info) as data:
            raw_target = data.read(MAX_LINK_TARGET + 1)
        if len(raw_target) > MAX_LINK_TARGET:
            raise _Refused("symlink target is too long")
        target = raw_target.decode("utf-8", errors="surrogateescape")
        return _Member(info.filename, "symlink", 0, mode, link=target)
    special = _ZIP_SPECIAL_TYPES.get(file_type)
    if special is not None:
        return _Member(info.filename, "file", 0, mode, refused=special)
    if info.is_dir() or file_type == stat.S_IFDIR:
        return _Member(info.filename, "directory", 0, mode)

    def opener() -> IO[bytes]:
        return archive.open(info)

    return _Member(info.filename, "file", info.file_size, mode, open=opener)


_ZIP_SPECIAL_TYPES = {
    stat.S_IFCHR: "character device files are not allowed",
    stat.S_IFBLK: "block device files are not allowed",
    stat.S_IFIFO: "fifos are not allowed",
    stat.S_IFSOCK: "sockets are not allowed",
}


# -- the rules ------------------------------------------------------------------------


def _split_name(name: str) -> Parts:
    if "\x00" in name:
        raise _Refused("the name contains a NUL character")
    if "\\" in name:
        raise _Refused("the name contains a backslash")
    if name.startswith("/"):
        raise _Refused("absolute paths are not allowed")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise _Refused("'..' in a path is not allowed (it could leave the target)")
    return parts


class _Sink(Protocol):
    def directory(self, parts: Parts) -> None: ...
    def file(self, parts: Parts, mode: int) -> BinaryIO: ...
    def symlink(self, parts: Parts, target: str) -> None: ...
    def hardlink(self, parts: Parts, existing: Parts) -> None: ...
    def finish(self) -> None: ...


class _Rules:
    """Folds the members one by one, refusing as early as possible."""

    def __init__(self, limits: ArchiveLimits, sink: _Sink | None) -> None:
        self.limits = limits
        self.sink = sink
        self.members = 0
        self.total_bytes = 0
        self.counts = {"file": 0, "directory": 0, "symlink": 0, "hardlink": 0}
        self.kinds: dict[Parts, Kind] = {}  # every path seen, implicit parents as directories
        self.sizes: dict[Parts, int] = {}
        self.links: dict[Parts, str] = {}

    def add(self, member: _Member) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise _Refused(f"more than {self.limits.max_members} members")
        if member.refused is not None:
            raise _Refused(member.refused)
        parts = _split_name(member.name)
        if not parts:
            if member.kind == "directory":
                return  # the root itself ("./")
            raise _Refused("the name is empty")
        self._check_place(parts, member.kind)
        if member.kind == "directory":
            self._directory(parts)
        elif member.kind == "file":
            self._file(parts, member)
        elif member.kind == "symlink":
            self._symlink(parts, member.link or "")
        else:
            self._hardlink(parts, member.link or "")
        self.counts[member.kind] += 1

    def _check_place(self, parts: Parts, kind: Kind) -> None:
        for depth in range(1, len(parts)):
            prefix = parts[:depth]
            seen = self.kinds.get(prefix)
            if seen == "symlink":
                raise _Refused(f"the path passes through the symlink {'/'.join(prefix)!r}")
            if seen is not None and seen != "directory":
                raise _Refused(f"{'/'.join(prefix)!r} is not a directory")
        existing = self.kinds.get(parts)
        if existing is not None and not (existing == kind == "directory"):
            raise _Refused("a member with this name already exists")

    def _note(self, parts: Parts, kind: Kind) -> None:
        for depth in range(1, len(parts)):
            self.kinds.setdefault(parts[:depth], "directory")
        self.kinds[parts] = kind

    def _directory(self, parts: Parts) -> None:
        if self.kinds.get(parts) == "directory":
            return
        self._note(parts, "directory")
        if self.sink is not None:
            self.sink.directory(parts)

    def _file(self, parts: Parts, member: _Member) -> None:
        limit = self.limits.max_total_bytes
        if self.total_bytes + member.size > limit:
            raise _Refused(
                f"its header announces {member.size} bytes, which would exceed the limit "
                f"of {limit} unpacked bytes"
            )
        assert member.open is not None
        self._note(parts, "file")
        out = self.sink.file(parts, member.mode) if self.sink is not None else None
        written = 0
        try:
            with member.open() as data:
                while chunk := data.read(CHUNK_SIZE):
                    written += len(chunk)
                    self.total_bytes += len(chunk)
                    if self.total_bytes > limit:
                        raise _Refused(f"unpacking it would exceed the limit of {limit} bytes")
                    if out is not None:
                        out.write(chunk)
        finally:
            if out is not None:
                out.close()
        self.sizes[parts] = written

    def _symlink(self, parts: Parts, target: str) -> None:
        if not target:
            raise _Refused("the symlink has an empty target")
        if "\x00" in target:
            raise _Refused("the symlink target contains a NUL character")
        if target.startswith("/"):
            raise _Refused(f"symlink to the absolute path {target!r} (it would leave the target)")
        depth = len(parts) - 1
        for component in target.split("/"):
            if component == "..":
                depth -= 1
                if depth < 0:
                    raise _Refused(f"symlink to {target!r} leaves the target")
            elif component not in ("", "."):
                depth += 1
        self._note(parts, "symlink")
        self.links[parts] = target
        if self.sink is not None:
            self.sink.symlink(parts, target)

    def _hardlink(self, parts: Parts, target: str) -> None:
        try:
            existing = _split_name(target)
        except _Refused as exc:
            raise _Refused(f"hard link to {target!r} leaves the target ({exc.reason})") from None
        if self.kinds.get(existing) != "file":
            raise _Refused(f"hard link to {target!r}, which is not an earlier regular file")
        size = self.sizes[existing]
        limit = self.limits.max_total_bytes
        if self.total_bytes + size > limit:
            raise _Refused(f"unpacking it would exceed the limit of {limit} bytes")
        self.total_bytes += size
        self._note(parts, "hardlink")
        self.sizes[parts] = size
        if self.sink is not None:
            self.sink.hardlink(parts, existing)

    def check_links(self) -> None:
        """Once every member is known: no symlink resolves through another symlink."""
        for parts, target in self.links.items():
            location = list(parts[:-1])
            components = [c for c in target.split("/") if c not in ("", ".")]
            for index, component in enumerate(components):
                if component == "..":
                    location.pop()
                    continue
                location.append(component)
                if index < len(components) - 1 and self.kinds.get(tuple(location)) == "symlink":
                    raise UnsafeArchive(
                        f"symlink to {target!r} passes through the symlink "
                        f"{'/'.join(location)!r}; links through links are not allowed",
                        member="/".join(parts),
                    )

    def summary(self, fmt: str) -> ArchiveSummary:
        return ArchiveSummary(
            format=fmt,
            members=self.members,
            files=self.counts["file"],
            directories=self.counts["directory"],
            symlinks=self.counts["symlink"],
            hardlinks=self.counts["hardlink"],
            total_bytes=self.total_bytes,
            has_root_dockerfile=self.kinds.get((DOCKERFILE,)) in ("file", "hardlink"),
        )


def _scan(archive: Path, limits: ArchiveLimits, sink: _Sink | None) -> ArchiveSummary:
    fmt = _detect(archive)
    rules = _Rules(limits, sink)
    members = _zip_members(archive, limits) if fmt == "zip" else _tar_members(archive, fmt)
    current: str | None = None
    try:
        for member in members:
            current = member.name
            rules.add(member)
            current = None
        rules.check_links()
        if sink is not None:
            sink.finish()
    except _Refused as exc:
        raise UnsafeArchive(exc.reason, member=current) from None
    except _Corrupt as exc:
        raise UnsafeArchive(f"corrupt archive: {exc}", member=current) from None
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        zlib.error,
        lzma.LZMAError,
        EOFError,
        NotImplementedError,
    ) as exc:
        raise UnsafeArchive(f"corrupt archive: {exc}", member=current) from None
    except OSError as exc:
        if exc.errno in (
            errno.ENAMETOOLONG,
            errno.EEXIST,
            errno.ENOTDIR,
            errno.EISDIR,
            errno.ELOOP,
        ):
            raise UnsafeArchive(f"cannot be unpacked: {exc.strerror}", member=current) from None
        raise
    finally:
        members.close()
    return rules.summary(fmt)


# -- writing: the disk sink used by unpack_archive ----------------------------------


class _DiskSink:
    """Writes members under a private staging directory. The rules already guarantee
    that no path passes through a symlink; creation still never follows one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.symlinks: list[Path] = []

    def _path(self, parts: Parts) -> Path:
        return self.root.joinpath(*parts)

    def _parents(self, parts: Parts) -> None:
        current = self.root
        for part in parts[:-1]:
            current = current / part
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise _Refused(f"{current.relative_to(self.root).as_posix()!r} is not a directory")

    def directory(self, parts: Parts) -> None:
        self._parents(parts)
        path = self._path(parts)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise _Refused("a member with this name already exists") from None

    def file(self, parts: Parts, mode: int) -> BinaryIO:
        self._parents(parts)
        permissions = 0o755 if mode & 0o111 else 0o644
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self._path(parts), flags, permissions)
        os.fchmod(fd, permissions)
        return os.fdopen(fd, "wb")

    def symlink(self, parts: Parts, target: str) -> None:
        self._parents(parts)
        path = self._path(parts)
        os.symlink(target, path)
        self.symlinks.append(path)

    def hardlink(self, parts: Parts, existing: Parts) -> None:
        self._parents(parts)
        source = self._path(existing)
        if not stat.S_ISREG(os.lstat(source).st_mode):
            raise _Refused("hard link to something that is not a regular file")
        os.link(source, self._path(parts), follow_symlinks=False)

    def finish(self) -> None:
        # Belt and braces over the rules: every link, resolved on the real tree, stays inside.
        real_root = os.path.realpath(self.root)
        for link in self.symlinks:
            resolved = os.path.realpath(link)
            if os.path.commonpath([real_root, resolved]) != real_root:
                name = link.relative_to(self.root).as_posix()
                raise UnsafeArchive("the symlink resolves outside the target", member=name)


def _require_free(target: Path) -> None:
    if target.is_symlink():
        raise FileExistsError(errno.EEXIST, "unpack target is a symlink", str(target))
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(errno.EEXIST, "unpack target is not free", str(target))


# -- writing zips ---------------------------------------------------------------------


def _regular_file_inside(path: Path, real_root: Path) -> bool:
    try:
        resolved = path.resolve(strict=True)
        info = resolved.stat()
    except (OSError, RuntimeError):
        return False
    return stat.S_ISREG(info.st_mode) and resolved.is_relative_to(real_root)


def _write_zip(
    entries: list[tuple[str, Path | None]], destination: Path | str | BinaryIO, compress: bool
) -> tuple[int, int, int]:
    """Write `(name, file)` entries (file None: a directory, name ending in '/'); a
    partially written destination file is removed on failure."""
    if not isinstance(destination, (str, Path)):
        return _write_zip_to(entries, destination, compress)
    path = Path(destination)
    try:
        with path.open("wb") as out:
            return _write_zip_to(entries, out, compress)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _write_zip_to(
    entries: list[tuple[str, Path | None]], out: BinaryIO, compress: bool
) -> tuple[int, int, int]:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    files = directories = total = 0
    with zipfile.ZipFile(out, "w", compression=method, strict_timestamps=False) as archive:
        for name, path in entries:
            if path is None:
                directory = zipfile.ZipInfo(name)
                directory.external_attr = ((stat.S_IFDIR | 0o755) << 16) | 0x10
                archive.writestr(directory, b"")
                directories += 1
                continue
            info = zipfile.ZipInfo.from_file(path, name, strict_timestamps=False)
            info.compress_type = method
            with path.open("rb") as data, archive.open(info, "w") as sink:
                while chunk := data.read(CHUNK_SIZE):
                    sink.write(chunk)
                    total += len(chunk)
            files += 1
    return files, directories, total
