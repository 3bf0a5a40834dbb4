"""File storage: the content-addressed artifact store and safe archive handling.

No service is needed: everything happens under pytest's tmp_path.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import tarfile
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from app.storage import (
    ArchiveLimits,
    ArtifactNotFound,
    ChecksumMismatch,
    FilesystemArtifactStore,
    InvalidChecksum,
    TooLarge,
    UnsafeArchive,
    has_root_dockerfile,
    inspect_archive,
    unpack_archive,
    unpack_archive_async,
    zip_directory,
    zip_files,
)

MiB = 1024 * 1024


# -- helpers --------------------------------------------------------------------------


async def chunks_of(
    data: bytes, size: int, pulled: list[int] | None = None
) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        if pulled is not None:
            pulled.append(start)
        yield data[start : start + size]


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def tar_file(info_name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(info_name)
    info.size = len(data)
    info.mode = mode
    return info, data


def tar_link(name: str, target: str, *, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


def tar_dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


Member = tuple[tarfile.TarInfo, bytes | None]


def write_tar(path: Path, members: list[Member], *, mode: str = "w:gz") -> Path:
    options = {"preset": 0} if mode == "w:xz" else {}
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT, **options) as archive:  # type: ignore[call-overload]
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def write_zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, data in members:
            archive.writestr(info, data)
    return path


def zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.fixture
def store(tmp_path: Path) -> FilesystemArtifactStore:
    # fsync is exercised by the first test only; it costs time on a busy machine.
    return FilesystemArtifactStore(tmp_path / "artifacts", durable=False)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "out" / "unpacked"


def assert_untouched(target: Path) -> None:
    assert not target.exists()
    # No staging directory left next to it either.
    assert list(target.parent.iterdir()) == []


# -- artifact store -------------------------------------------------------------------


async def test_put_stream_stores_content_under_its_sha256_with_its_size(tmp_path: Path) -> None:
    store = FilesystemArtifactStore(tmp_path / "artifacts", durable=True)
    data = os.urandom(MiB + 17)
    stored = await store.put_stream(chunks_of(data, 64 * 1024), max_bytes=10 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    assert stored.sha256 == digest
    assert stored.size == len(data)
    assert stored.address == f"{digest[:2]}/{digest}"
    assert store.path(digest) == store.root / digest[:2] / digest
    assert store.path(digest).read_bytes() == data
    assert await store.exists(digest)
    assert await store.size(digest) == len(data)
    assert await store.verify(digest)
    assert [p.name for p in stored_files(store.root)] == [digest]


async def test_put_stream_writes_to_disk_while_receiving_not_at_the_end(
    store: FilesystemArtifactStore,
) -> None:
    seen_on_disk: list[int] = []

    async def source() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield b"x" * (MiB // 2)
            await asyncio.sleep(0.01)  # let the write thread run
            seen_on_disk.append(sum(p.stat().st_size for p in (store.root / "tmp").glob("*.part")))

    stored = await store.put_stream(source(), max_bytes=10 * MiB)
    assert stored.size == 3 * MiB
    # Before the last chunk arrived, most of the content was already in the temporary file.
    assert seen_on_disk[-2] >= 2 * MiB


async def test_put_stream_is_refused_as_soon_as_the_limit_is_passed_and_leaves_no_file(
    store: FilesystemArtifactStore,
) -> None:
    pulled: list[int] = []
    data = b"a" * (100 * 1024)
    with pytest.raises(TooLarge) as refused:
        await store.put_stream(chunks_of(data, 1024, pulled), max_bytes=10 * 1024)
    assert refused.value.limit == 10 * 1024
    assert refused.value.code == "payload_too_large"
    assert len(pulled) == 11  # stopped at the first chunk over the limit, not at the end
    assert stored_files(store.root) == []


async def test_an_upload_interrupted_by_the_client_leaves_no_file(
    store: FilesystemArtifactStore,
) -> None:
    async def disconnecting() -> AsyncIterator[bytes]:
        yield b"x" * (2 * MiB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put_stream(disconnecting(), max_bytes=10 * MiB)
    assert stored_files(store.root) == []


async def test_put_stream_accepts_content_exactly_at_the_limit(
    store: FilesystemArtifactStore,
) -> None:
    stored = await store.put_stream(chunks_of(b"b" * 4096, 1000), max_bytes=4096)
    assert stored.size == 4096


async def test_put_stream_with_a_wrong_checksum_is_refused_and_leaves_no_file(
    store: FilesystemArtifactStore,
) -> None:
    data = b"model weights"
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ChecksumMismatch) as refused:
        await store.put_stream(chunks_of(data, 4), max_bytes=1024, expected_sha256=wrong)
    assert refused.value.expected == wrong
    assert refused.value.actual == hashlib.sha256(data).hexdigest()
    assert stored_files(store.root) == []
    assert not await store.exists(hashlib.sha256(data).hexdigest())


async def test_put_stream_with_the_right_checksum_in_uppercase_is_accepted(
    store: FilesystemArtifactStore,
) -> None:
    data = b"opener.py content"
    digest = hashlib.sha256(data).hexdigest()
    stored = await store.put_bytes(data, expected_sha256=digest.upper())
    assert stored.sha256 == digest


async def test_putting_the_same_content_twice_is_idempotent(
    store: FilesystemArtifactStore,
) -> None:
    data = os.urandom(200_000)
    first, second = await asyncio.gather(
        store.put_stream(chunks_of(data, 8192), max_bytes=MiB),
        store.put_stream(chunks_of(data, 5000), max_bytes=MiB),
    )
    third = await store.put_bytes(data)
    assert first == second == third
    assert len(stored_files(store.root)) == 1
    assert store.path(first.sha256).read_bytes() == data


async def test_open_streams_the_content_back_in_chunks(store: FilesystemArtifactStore) -> None:
    data = os.urandom(2 * 65536 + 5)
    stored = await store.put_bytes(data)
    async with await store.open(stored.sha256, chunk_size=65536) as reader:
        assert reader.size == len(data)
        chunks = [chunk async for chunk in reader]
    assert [len(c) for c in chunks] == [65536, 65536, 5]
    assert b"".join(chunks) == data
    assert b"".join([c async for c in store.iter_chunks(stored.sha256)]) == data
    assert await store.read_bytes(stored.sha256, max_bytes=len(data)) == data
    with pytest.raises(TooLarge):
        await store.read_bytes(stored.sha256, max_bytes=len(data) - 1)


async def test_reading_a_missing_artifact_raises_not_found(store: FilesystemArtifactStore) -> None:
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert not await store.exists(missing)
    with pytest.raises(ArtifactNotFound):
        await store.open(missing)
    with pytest.raises(ArtifactNotFound):
        await store.size(missing)
    with pytest.raises(ArtifactNotFound):
        await store.verify(missing)


async def test_delete_removes_the_artifact(store: FilesystemArtifactStore) -> None:
    stored = await store.put_bytes(b"transient model")
    assert await store.delete(stored.sha256) is True
    assert not await store.exists(stored.sha256)
    assert stored_files(store.root) == []
    assert await store.delete(stored.sha256) is False


async def test_verify_detects_content_altered_on_disk(store: FilesystemArtifactStore) -> None:
    stored = await store.put_bytes(b"original")
    path = store.path(stored.sha256)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    assert await store.verify(stored.sha256) is False


@pytest.mark.parametrize("bad", ["../../etc/passwd", "abc", "z" * 64, ""])
async def test_a_checksum_that_is_not_a_sha256_is_refused_before_any_io(
    store: FilesystemArtifactStore, bad: str
) -> None:
    with pytest.raises(InvalidChecksum):
        await store.exists(bad)
    with pytest.raises(InvalidChecksum):
        await store.put_bytes(b"x", expected_sha256=bad)
    assert not store.root.exists()


async def test_stale_temporary_uploads_are_removed(store: FilesystemArtifactStore) -> None:
    await store.put_bytes(b"kept")
    stale = store.root / "tmp" / "dead.part"
    stale.write_bytes(b"half an upload")
    os.utime(stale, (0, 0))
    assert await store.remove_stale_uploads(older_than_s=60) == 1
    assert not stale.exists()
    assert len(stored_files(store.root)) == 1


# -- archives: good ones --------------------------------------------------------------


def test_a_good_tar_gz_unpacks_with_its_tree_links_and_modes(tmp_path: Path, target: Path) -> None:
    archive = write_tar(
        tmp_path / "fn.tar.gz",
        [
            tar_dir("."),
            tar_file("./Dockerfile", b"FROM python:3.11\n"),
            tar_dir("./src"),
            tar_file("./src/main.py", b"print('hi')\n"),
            tar_file("./bin/run.sh", b"#!/bin/sh\n", mode=0o4755),
            tar_link("./main.py", "src/main.py"),
            tar_link("./copy.py", "src/main.py", hard=True),
        ],
    )
    target.parent.mkdir()
    summary = unpack_archive(archive, target)
    assert (target / "Dockerfile").read_bytes() == b"FROM python:3.11\n"
    assert (target / "src" / "main.py").read_text() == "print('hi')\n"
    assert os.readlink(target / "main.py") == "src/main.py"
    assert (target / "main.py").read_text() == "print('hi')\n"
    assert (target / "copy.py").stat().st_ino == (target / "src" / "main.py").stat().st_ino
    assert stat.S_IMODE((target / "bin" / "run.sh").stat().st_mode) == 0o755  # setuid dropped
    assert summary.format == "tar.gz"
    assert (summary.files, summary.symlinks, summary.hardlinks) == (3, 1, 1)
    assert summary.has_root_dockerfile
    assert sorted(p.name for p in target.parent.iterdir()) == ["unpacked"]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_every_tar_compression_unpacks(tmp_path: Path, target: Path, mode: str) -> None:
    archive = write_tar(tmp_path / "a.tar", [tar_file("a/b.txt", b"hello")], mode=mode)
    unpack_archive(archive, target)
    assert (target / "a" / "b.txt").read_bytes() == b"hello"


def test_a_good_zip_unpacks(tmp_path: Path, target: Path) -> None:
    executable = zipfile.ZipInfo("run.sh")
    executable.create_system = 3
    executable.external_attr = (stat.S_IFREG | 0o755) << 16
    archive = write_zip(
        tmp_path / "data.zip",
        [
            ("data/", b""),
            ("data/x.csv", b"1,2\n"),
            (executable, b"#!/bin/sh\n"),
            zip_symlink("latest.csv", "data/x.csv"),
        ],
    )
    summary = unpack_archive(archive, target)
    assert (target / "data" / "x.csv").read_bytes() == b"1,2\n"
    assert os.access(target / "run.sh", os.X_OK)
    assert os.readlink(target / "latest.csv") == "data/x.csv"
    assert summary.format == "zip"
    assert not summary.has_root_dockerfile


def test_unpacking_into_an_existing_empty_directory_works_and_a_full_one_is_refused(
    tmp_path: Path, target: Path
) -> None:
    archive = write_tar(tmp_path / "a.tar.gz", [tar_file("f", b"1")])
    target.mkdir(parents=True)
    unpack_archive(archive, target)
    assert (target / "f").read_bytes() == b"1"
    with pytest.raises(FileExistsError):
        unpack_archive(archive, target)


async def test_unpack_can_run_off_the_event_loop(tmp_path: Path, target: Path) -> None:
    archive = write_tar(tmp_path / "a.tar.gz", [tar_file("f", b"1")])
    summary = await unpack_archive_async(archive, target)
    assert summary.files == 1


# -- archives: hostile ones -----------------------------------------------------------


def hostile_tars() -> dict[str, tuple[list[Member], str]]:
    return {
        "dot-dot": ([tar_file("ok.txt", b"1"), tar_file("../evil", b"x")], "'..'"),
        "nested dot-dot": ([tar_file("a/../../evil", b"x")], "'..'"),
        "absolute": ([tar_file("/etc/x", b"x")], "absolute"),
        "symlink to /etc/passwd then a write through it": (
            [tar_link("passwd", "/etc/passwd"), tar_file("passwd", b"root::0:0::/:/bin/sh\n")],
            "absolute",
        ),
        "symlink to a directory outside then a file below it": (
            [tar_link("up", "../.."), tar_file("up/evil", b"x")],
            "leaves the target",
        ),
        "file written through an inside symlink": (
            [tar_dir("sub"), tar_link("alias", "sub"), tar_file("alias/f", b"x")],
            "passes through the symlink",
        ),
        "link chain escaping through another link": (
            [tar_link("b", "."), tar_link("x", "b/..")],
            "passes through the symlink",
        ),
        "hardlink to an absolute path": ([tar_link("h", "/etc/passwd", hard=True)], "hard link"),
        "hardlink outside": ([tar_link("h", "../outside", hard=True)], "hard link"),
        "hardlink to a non-member": ([tar_link("h", "nothing", hard=True)], "hard link"),
        "duplicate member": ([tar_file("f", b"1"), tar_file("f", b"2")], "already exists"),
    }


@pytest.mark.parametrize("case", sorted(hostile_tars()))
def test_a_hostile_tar_is_refused_and_the_target_is_untouched(
    tmp_path: Path, target: Path, case: str
) -> None:
    members, reason = hostile_tars()[case]
    archive = write_tar(tmp_path / "evil.tar.gz", members)
    target.parent.mkdir()
    with pytest.raises(UnsafeArchive) as refused:
        unpack_archive(archive, target)
    assert reason in str(refused.value)
    assert refused.value.code == "unsafe_archive"
    assert_untouched(target)
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "outside").exists()
    with pytest.raises(UnsafeArchive):
        inspect_archive(archive)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [(tarfile.FIFOTYPE, "fifo"), (tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block")],
)
def test_a_tar_with_a_device_or_fifo_member_is_refused(
    tmp_path: Path, target: Path, kind: bytes, reason: str
) -> None:
    special = tarfile.TarInfo("dev/thing")
    special.type = kind
    special.devmajor, special.devminor = 1, 3
    archive = write_tar(tmp_path / "dev.tar", [tar_file("ok", b"1"), (special, None)], mode="w")
    with pytest.raises(UnsafeArchive) as refused:
        unpack_archive(archive, target)
    assert refused.value.member == "dev/thing"
    assert reason in refused.value.reason
    assert_untouched(target)


def hostile_zips() -> dict[str, tuple[list[tuple[zipfile.ZipInfo | str, bytes]], str]]:
    fifo = zipfile.ZipInfo("pipe")
    fifo.create_system = 3
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    return {
        "dot-dot": ([("ok.txt", b"1"), ("../evil", b"x")], "'..'"),
        "absolute": ([("/etc/x", b"x")], "absolute"),
        "backslash": ([("..\\evil", b"x")], "backslash"),
        "symlink to /etc/passwd then a write through it": (
            [zip_symlink("passwd", "/etc/passwd"), ("passwd", b"x")],
            "absolute",
        ),
        "symlink out then a file below it": (
            [zip_symlink("up", "../"), ("up/evil", b"x")],
            "leaves the target",
        ),
        "fifo": ([(fifo, b"")], "fifo"),
    }


@pytest.mark.parametrize("case", sorted(hostile_zips()))
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_a_hostile_zip_is_refused_and_the_target_is_untouched(
    tmp_path: Path, target: Path, case: str
) -> None:
    members, reason = hostile_zips()[case]
    archive = write_zip(tmp_path / "evil.zip", members)
    target.parent.mkdir()
    with pytest.raises(UnsafeArchive) as refused:
        unpack_archive(archive, target)
    assert reason in str(refused.value)
    assert_untouched(target)
    assert not (tmp_path / "evil").exists()


def test_refusal_names_the_member_and_the_reason(tmp_path: Path, target: Path) -> None:
    archive = write_tar(tmp_path / "a.tar.gz", [tar_file("fine", b"1"), tar_file("../evil", b"")])
    with pytest.raises(UnsafeArchive) as refused:
        unpack_archive(archive, target)
    assert refused.value.member == "../evil"
    assert str(refused.value).startswith("archive member '../evil': ")


ZEROS = b"\0" * (3 * MiB)
SMALL = ArchiveLimits(max_total_bytes=1 * MiB, max_members=10)


def test_a_zip_bomb_over_the_size_limit_is_refused(tmp_path: Path, target: Path) -> None:
    archive = write_zip(tmp_path / "bomb.zip", [("zeros.bin", ZEROS)])
    assert archive.stat().st_size < 64 * 1024
    with pytest.raises(UnsafeArchive) as refused:
        unpack_archive(archive, target, limits=SMALL)
    # Refused from the central directory, before anything was decompressed.
    assert "declares 3145728 unpacked bytes" in str(refused.value)
    assert_untouched(target)


def test_a_tar_gz_bomb_over_the_size_limit_is_refused(tmp_path: Path, target: Path) -> None:
    archive = write_tar(
        tmp_path / "bomb.tar.gz",
        [tar_file("a.bin", ZEROS[: MiB // 2]), tar_file("b.bin", ZEROS[: MiB // 2 + 1])],
    )
    assert archive.stat().st_size < 64 * 1024
    with pytest.raises(UnsafeArchive) as refused:
        unpack_archive(archive, target, limits=SMALL)
    assert refused.value.member == "b.bin"
    assert "header announces 524289 bytes" in refused.value.reason  # refused before reading
    assert_untouched(target)


def test_hard_links_count_toward_the_size_limit(tmp_path: Path, target: Path) -> None:
    members: list[Member] = [tar_file("big", ZEROS[: MiB // 2])]
    members += [tar_link(f"link{i}", "big", hard=True) for i in range(2)]
    archive = write_tar(tmp_path / "links.tar.gz", members)
    with pytest.raises(UnsafeArchive):
        unpack_archive(archive, target, limits=SMALL)
    assert_untouched(target)


def test_a_tar_header_bomb_is_refused_without_filling_the_memory(
    tmp_path: Path, target: Path
) -> None:
    info, data = tar_file("f", b"1")
    info.pax_headers = {"comment": "x" * (2 * MiB)}
    archive = write_tar(tmp_path / "header.tar.gz", [(info, data)])
    assert archive.stat().st_size < 64 * 1024
    with pytest.raises(UnsafeArchive) as refused:
        unpack_archive(archive, target)
    assert "header" in str(refused.value)
    assert_untouched(target)


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_too_many_members_is_refused(tmp_path: Path, target: Path, fmt: str) -> None:
    names = [f"f{i}" for i in range(11)]
    if fmt == "tar":
        archive = write_tar(tmp_path / "many.tar.gz", [tar_file(n, b"") for n in names])
    else:
        archive = write_zip(tmp_path / "many.zip", [(n, b"") for n in names])
    with pytest.raises(UnsafeArchive) as refused:
        unpack_archive(archive, target, limits=SMALL)
    assert "10" in str(refused.value)
    assert_untouched(target)
    # Exactly at the limit is fine.
    unpack_archive(archive, target, limits=ArchiveLimits(max_total_bytes=MiB, max_members=11))


@pytest.mark.parametrize(
    "content",
    [b"", b"just some text, not an archive" * 40, b"PK\x03\x04broken", b"\x1f\x8bnot gzip"],
)
def test_a_file_that_is_not_a_valid_archive_is_refused(
    tmp_path: Path, target: Path, content: bytes
) -> None:
    path = tmp_path / "junk"
    path.write_bytes(content)
    with pytest.raises(UnsafeArchive):
        unpack_archive(path, target)
    assert_untouched(target)


def test_a_truncated_archive_is_refused(tmp_path: Path, target: Path) -> None:
    archive = write_tar(tmp_path / "a.tar.gz", [tar_file("f", os.urandom(200_000))])
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:100_000])
    with pytest.raises(UnsafeArchive) as refused:
        unpack_archive(truncated, target)
    assert "corrupt" in str(refused.value)
    assert_untouched(target)


# -- Dockerfile check -----------------------------------------------------------------


ArchiveBuilder = Callable[[Path, list[str]], Path]


def build_tar(path: Path, names: list[str]) -> Path:
    return write_tar(path.with_suffix(".tar.gz"), [tar_file(n, b"FROM scratch\n") for n in names])


def build_zip(path: Path, names: list[str]) -> Path:
    return write_zip(path.with_suffix(".zip"), [(n, b"FROM scratch\n") for n in names])


@pytest.mark.parametrize("build", [build_tar, build_zip])
@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["Dockerfile", "app.py"], True),
        (["./Dockerfile"], True),
        (["project/Dockerfile"], False),
        (["dockerfile"], False),
        (["app.py"], False),
    ],
)
def test_the_dockerfile_check_wants_a_regular_file_at_the_root(
    tmp_path: Path, build: ArchiveBuilder, names: list[str], expected: bool
) -> None:
    archive = build(tmp_path / "fn", names)
    assert has_root_dockerfile(archive) is expected
    assert [p.name for p in tmp_path.iterdir()] == [archive.name]  # nothing unpacked


def test_the_dockerfile_check_refuses_a_hostile_archive(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "a.tar.gz", [tar_file("Dockerfile", b""), tar_file("../x", b"")])
    with pytest.raises(UnsafeArchive):
        has_root_dockerfile(archive)


# -- zips for downloads ---------------------------------------------------------------


def test_zip_directory_streams_the_tree_without_following_links_out(tmp_path: Path) -> None:
    tree = tmp_path / "dataset"
    (tree / "train" / "empty").mkdir(parents=True)
    (tree / "train" / "a.csv").write_bytes(b"1,2\n")
    (tree / "README").write_bytes(b"readme")
    (tree / "inside-link").symlink_to("README")
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not leak")
    (tree / "outside-link").symlink_to(secret)
    (tree / "dir-link").symlink_to(tree / "train")
    zipped = tmp_path / "dataset.zip"
    summary = zip_directory(tree, zipped)
    with zipfile.ZipFile(zipped) as archive:
        names = sorted(archive.namelist())
        assert archive.read("train/a.csv") == b"1,2\n"
        assert archive.read("inside-link") == b"readme"
    assert names == ["README", "inside-link", "train/", "train/a.csv", "train/empty/"]
    assert sorted(summary.skipped) == ["dir-link", "outside-link"]
    assert (summary.files, summary.total_bytes) == (3, 4 + 6 + 6)
    # What we write, we can unpack safely.
    unpack_archive(zipped, tmp_path / "roundtrip")
    assert (tmp_path / "roundtrip" / "train" / "a.csv").read_bytes() == b"1,2\n"


def test_zip_files_writes_named_entries_to_a_stream(tmp_path: Path) -> None:
    first, second = tmp_path / "1", tmp_path / "2"
    first.write_bytes(b"one")
    second.write_bytes(b"two" * 1000)
    out = io.BytesIO()
    summary = zip_files([("a/one.txt", first), ("two.txt", second)], out, compress=False)
    assert summary.files == 2
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
        assert archive.read("a/one.txt") == b"one"
        assert archive.read("two.txt") == b"two" * 1000
    with pytest.raises(ValueError):
        zip_files([("../escape", first)], tmp_path / "bad.zip")
    with pytest.raises(ValueError):
        zip_files([("x", first), ("./x", second)], tmp_path / "dup.zip")
