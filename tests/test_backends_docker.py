"""The Docker backend against the machine's engine, with the locally built test images
(tests/images.py): the container contract of SPEC "Execution" and image preparation."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from runner.backends.docker_backend import DockerBackend, container_kwargs
from runner.contract import (
    BackendOptions,
    BuildError,
    ImageSourceKind,
    ImageSpec,
    RunSpec,
    choose_backend,
)
from tests import images
from tests.backend_tasks import MODEL_KEY, Logs, run, sh
from tests.backend_tasks import task as shared_task

# The session fixtures of tests/images.py, brought in by assignment (an import would read
# as an unused name redefined by each test's parameter).
docker_engine = images.docker_engine
busybox_image = images.busybox_image
python_image = images.python_image

@pytest.fixture
async def backend(docker_engine: docker.DockerClient) -> AsyncIterator[DockerBackend]:
    backend = DockerBackend(docker_engine)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A task dir as the orchestration prepares it: input/ filled, output/ empty."""
    root = tmp_path / "task"
    (root / "input" / "models").mkdir(parents=True)
    model = root / "input" / "models" / MODEL_KEY
    model.write_text("41\n")
    model.chmod(0o600)  # as a download may leave it: the container user must still read it
    (root / "output").mkdir()
    return root


def task(workdir: Path, image: str, command: list[str], **fields: object) -> RunSpec:
    return shared_task(workdir, command, image, **fields)


def containers_of(client: docker.DockerClient, spec: RunSpec) -> list[object]:
    filters = {"label": f"consort.task_key={spec.task_key}"}
    return list(client.containers.list(all=True, filters=filters))


# -- the container contract -----------------------------------------------------------


async def test_io_json_lists_inputs_and_outputs_and_is_the_last_argument(
    backend: DockerBackend, busybox_image: str, workdir: Path
) -> None:
    spec = task(workdir, busybox_image, sh('echo "arg=$1"; echo "env=$CONSORT_IO"; pwd'))
    result, logs = await run(backend, spec)
    assert result.exit_code == 0, logs.text
    assert logs.text.split() == ["arg=/consort/io.json", "env=/consort/io.json", "/consort"]
    document = json.loads((workdir / "io.json").read_text())
    assert document["inputs"] == [{
        "identifier": "model", "kind": "MODEL", "key": MODEL_KEY,
        "path": f"/consort/input/models/{MODEL_KEY}",
    }]
    assert [o["path"] for o in document["outputs"]] == [
        "/consort/output/model", "/consort/output/performance"
    ]
    assert document["input_dir"] == "/consort/input"
    assert document["output_dir"] == "/consort/output"


async def test_input_dir_is_read_only(
    backend: DockerBackend, busybox_image: str, workdir: Path
) -> None:
    script = (
        'cat "input/models/$MODEL"; '
        "echo 1 >> input/models/$MODEL && exit 3; "
        "touch input/new && exit 4; "
        "echo refused"
    )
    spec = task(workdir, busybox_image, sh(script), environment={"MODEL": MODEL_KEY})
    result, logs = await run(backend, spec)
    assert result.exit_code == 0, logs.text
    assert "41" in logs.text and "refused" in logs.text
    assert "Read-only file system" in logs.text
    assert (workdir / "input" / "models" / MODEL_KEY).read_text() == "41\n"
    assert not (workdir / "input" / "new").exists()


async def test_output_is_collected_from_the_output_dir(
    backend: DockerBackend, busybox_image: str, workdir: Path
) -> None:
    script = (
        'read n < "input/models/$MODEL"; echo $((n + 1)) > output/model; '
        "echo 0.75 > output/performance"
    )
    spec = task(workdir, busybox_image, sh(script), environment={"MODEL": MODEL_KEY})
    result, logs = await run(backend, spec)
    assert result.exit_code == 0, logs.text
    assert (workdir / "output" / "model").read_text() == "42\n"
    assert float((workdir / "output" / "performance").read_text()) == 0.75


async def test_runs_as_a_non_root_user(
    backend: DockerBackend, busybox_image: str, workdir: Path
) -> None:
    result, logs = await run(backend, task(workdir, busybox_image, sh("id -u; id -g")))
    assert result.exit_code == 0
    assert logs.text.split() == ["65534", "65534"]


async def test_environment_entrypoint_and_command_are_honoured(
    backend: DockerBackend, busybox_image: str, workdir: Path
) -> None:
    spec = task(
        workdir, busybox_image, ['echo "$GREETING $0 $#"', "world"],
        entrypoint=["sh", "-c"], environment={"GREETING": "hello"},
    )
    result, logs = await run(backend, spec)
    assert result.exit_code == 0, logs.text
    assert logs.text.strip() == "hello world 1"  # $1 is io.json


async def test_network_is_disabled_by_default(
    backend: DockerBackend, busybox_image: str, workdir: Path
) -> None:
    result, logs = await run(backend, task(workdir, busybox_image, sh("ls /sys/class/net")))
    assert result.exit_code == 0
    assert logs.text.split() == ["lo"]
    result, logs = await run(
        backend, task(workdir, busybox_image, sh("ls /sys/class/net"), network=True)
    )
    assert "eth0" in logs.text.split()


async def test_cpu_and_memory_limits_are_applied(
    backend: DockerBackend, busybox_image: str, workdir: Path, docker_engine: docker.DockerClient
) -> None:
    spec = task(workdir, busybox_image, sh("sleep 2"), cpus=0.5, memory_bytes=64 * 1024**2)
    running = asyncio.create_task(run(backend, spec))
    attrs: dict[str, object] = {}
    for _ in range(100):
        found = await asyncio.to_thread(containers_of, docker_engine, spec)
        if found:
            attrs = found[0].attrs  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.05)
    result, _ = await running
    assert result.exit_code == 0
    host = attrs["HostConfig"]
    assert host["Memory"] == 64 * 1024**2  # type: ignore[index]
    assert host["NanoCpus"] == 500_000_000  # type: ignore[index]
    assert host["NetworkMode"] == "none"  # type: ignore[index]
    assert host["SecurityOpt"] == ["no-new-privileges"]  # type: ignore[index]
    mounts = {m["Destination"]: m["RW"] for m in attrs["Mounts"]}  # type: ignore[attr-defined]
    assert mounts == {"/consort/input": False, "/consort/output": True, "/consort/io.json": False}


def test_gpu_tasks_request_every_gpu(tmp_path: Path) -> None:
    spec = task(tmp_path, "img", ["true"], gpu=True)
    kwargs = container_kwargs(spec, command=["true"], mounts=[], user=None, security_opt=[])
    [request] = kwargs["device_requests"]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
    assert "device_requests" not in container_kwargs(
        task(tmp_path, "img", ["true"]), command=["true"], mounts=[], user=None, security_opt=[]
    )


async def test_logs_are_streamed_while_the_task_runs(
    backend: DockerBackend, busybox_image: str, workdir: Path
) -> None:
    spec = task(workdir, busybox_image, sh("echo first; sleep 1; echo second"))
    result, logs = await run(backend, spec)
    ended = result.started_at_monotonic + result.duration_s
    assert result.exit_code == 0
    assert logs.text.split() == ["first", "second"]
    assert logs.chunks[0].strip() == b"first"
    assert logs.arrivals[0] < ended - 0.5, "the first line came only at the end"


async def test_stdout_and_stderr_are_both_logged(
    backend: DockerBackend, busybox_image: str, workdir: Path
) -> None:
    result, logs = await run(backend, task(workdir, busybox_image, sh("echo out; echo err >&2")))
    assert sorted(logs.text.split()) == ["err", "out"]


async def test_timeout_kills_the_task(
    backend: DockerBackend, busybox_image: str, workdir: Path, docker_engine: docker.DockerClient
) -> None:
    spec = task(workdir, busybox_image, sh("sleep 30"), timeout_s=1.0)
    result, _ = await run(backend, spec)
    assert result.timed_out and not result.canceled
    assert result.duration_s < 4
    assert containers_of(docker_engine, spec) == []


async def test_cancel_stops_the_task_within_5_seconds(
    backend: DockerBackend, busybox_image: str, workdir: Path, docker_engine: docker.DockerClient
) -> None:
    cancel = asyncio.Event()
    spec = task(workdir, busybox_image, sh("echo started; sleep 30"))
    running = asyncio.create_task(run(backend, spec, cancel))
    await asyncio.sleep(1.0)
    asked = time.monotonic()
    cancel.set()
    result, logs = await running
    assert time.monotonic() - asked < 5
    assert result.canceled and not result.timed_out
    assert "started" in logs.text
    assert containers_of(docker_engine, spec) == []


async def test_abandoned_run_still_removes_its_container(
    backend: DockerBackend, busybox_image: str, workdir: Path, docker_engine: docker.DockerClient
) -> None:
    # The runner's own task is cancelled (e.g. at shutdown), not the task's cancel event.
    spec = task(workdir, busybox_image, sh("sleep 30"))
    running = asyncio.create_task(run(backend, spec))
    for _ in range(100):
        if await asyncio.to_thread(containers_of, docker_engine, spec):
            break
        await asyncio.sleep(0.05)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert containers_of(docker_engine, spec) == []


async def test_cancel_before_start_runs_nothing(
    backend: DockerBackend, busybox_image: str, workdir: Path
) -> None:
    cancel = asyncio.Event()
    cancel.set()
    result, logs = await run(backend, task(workdir, busybox_image, sh("echo no")), cancel)
    assert result.canceled and result.exit_code is None and logs.chunks == []


async def test_exit_code_is_reported_and_the_container_removed(
    backend: DockerBackend, busybox_image: str, workdir: Path, docker_engine: docker.DockerClient
) -> None:
    spec = task(workdir, busybox_image, sh("echo failing; exit 1"))
    result, logs = await run(backend, spec)
    assert result.exit_code == 1 and not result.timed_out and not result.canceled
    assert "failing" in logs.text
    assert containers_of(docker_engine, spec) == []


async def test_missing_command_fails_fast(
    backend: DockerBackend, busybox_image: str, workdir: Path, docker_engine: docker.DockerClient
) -> None:
    spec = task(workdir, busybox_image, ["no-such-command"])
    called = time.monotonic()
    result, logs = await run(backend, spec)
    assert time.monotonic() - called < 10
    assert result.exit_code == 127
    assert result.error and "no-such-command" in result.error
    assert "no-such-command" in logs.text
    assert containers_of(docker_engine, spec) == []


async def test_event_loop_stays_responsive_during_a_run(
    backend: DockerBackend, busybox_image: str, workdir: Path
) -> None:
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    beating = asyncio.create_task(ticker())
    try:
        await run(backend, task(workdir, busybox_image, sh("sleep 1")))
    finally:
        beating.cancel()
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:], strict=False)]
    assert max(gaps) < 0.25, f"the loop stalled for {max(gaps):.2f} s"


# -- images ---------------------------------------------------------------------------


def tar_archive(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, content in files.items():
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            archive.addfile(info, io.BytesIO(data))
    return path


def archive_spec(path: Path) -> ImageSpec:
    return ImageSpec(
        function_key=str(uuid.uuid4()),
        source=ImageSourceKind.DOCKERFILE_ARCHIVE,
        checksum=None,  # computed from the file
        archive_path=path,
        reference=None,
    )


@pytest.fixture
def cleanup_images(docker_engine: docker.DockerClient) -> Iterator[list[str]]:
    tags: list[str] = []
    yield tags
    for tag in tags:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_engine.images.remove(tag, force=True)


async def test_dockerfile_archive_is_built_once_and_reused(
    backend: DockerBackend,
    busybox_image: str,
    workdir: Path,
    tmp_path: Path,
    docker_engine: docker.DockerClient,
    cleanup_images: list[str],
) -> None:
    archive = tar_archive(tmp_path / "function.tar.gz", {
        "Dockerfile": f"FROM {busybox_image}\nCOPY hello.sh /app/hello.sh\n",
        "hello.sh": "#!/bin/sh\necho hello from the function\n",
    })
    spec = archive_spec(archive)
    tag = await backend.prepare_image(spec)
    cleanup_images.append(tag)
    assert tag.startswith(f"consort-fn/{spec.function_key}:")
    built = docker_engine.images.get(tag)
    assert built.labels["consort.function_key"] == spec.function_key

    # A restarted runner (a new backend) finds the tag instead of building again.
    again = DockerBackend(docker_engine)
    started = time.monotonic()
    assert await again.prepare_image(spec) == tag
    assert time.monotonic() - started < 1.0
    await again.close()
    assert docker_engine.images.get(tag).id == built.id

    result, logs = await run(backend, task(workdir, tag, ["/app/hello.sh"]))
    assert result.exit_code == 0, logs.text
    assert logs.text.strip() == "hello from the function"


async def test_concurrent_preparations_build_once(
    backend: DockerBackend, busybox_image: str, tmp_path: Path,
    docker_engine: docker.DockerClient, cleanup_images: list[str],
) -> None:
    archive = tar_archive(tmp_path / "f.tar.gz", {"Dockerfile": f"FROM {busybox_image}\n"})
    spec = archive_spec(archive)
    tags = await asyncio.gather(*(backend.prepare_image(spec) for _ in range(3)))
    cleanup_images.append(tags[0])
    assert len(set(tags)) == 1


async def test_bad_dockerfile_is_a_build_error(
    backend: DockerBackend, busybox_image: str, tmp_path: Path
) -> None:
    archive = tar_archive(tmp_path / "bad.tar.gz", {
        "Dockerfile": f"FROM {busybox_image}\nRUN echo about to fail && exit 3\n",
    })
    with pytest.raises(BuildError) as caught:
        await backend.prepare_image(archive_spec(archive))
    assert "returned a non-zero code: 3" in str(caught.value)
    assert "about to fail" in caught.value.log_tail


async def test_archive_without_dockerfile_is_a_build_error(
    backend: DockerBackend, tmp_path: Path
) -> None:
    archive = tar_archive(tmp_path / "nodockerfile.tar.gz", {"train.py": "print(1)\n"})
    with pytest.raises(BuildError, match="no Dockerfile"):
        await backend.prepare_image(archive_spec(archive))


async def test_image_tarball_is_loaded_and_tagged(
    backend: DockerBackend, busybox_image: str, workdir: Path, tmp_path: Path,
    docker_engine: docker.DockerClient, cleanup_images: list[str],
) -> None:
    tarball = tmp_path / "image.tar"
    source = docker_engine.images.get(busybox_image)
    with tarball.open("wb") as out:
        for chunk in source.save(named=True):
            out.write(chunk)
    spec = ImageSpec(str(uuid.uuid4()), ImageSourceKind.IMAGE_TARBALL, None, tarball, None)
    tag = await backend.prepare_image(spec)
    cleanup_images.append(tag)
    assert tag.startswith(f"consort-fn/{spec.function_key}:")
    assert docker_engine.images.get(tag).id == source.id
    result, logs = await run(backend, task(workdir, tag, sh("echo loaded")))
    assert logs.text.strip() == "loaded"


async def test_image_reference_present_locally_is_used_without_pulling(
    backend: DockerBackend, busybox_image: str
) -> None:
    spec = ImageSpec("f", ImageSourceKind.IMAGE_REFERENCE, None, None, busybox_image)
    started = time.monotonic()
    assert await backend.prepare_image(spec) == busybox_image
    assert time.monotonic() - started < 1.0


async def test_absent_reference_that_cannot_be_pulled_is_a_build_error(
    backend: DockerBackend,
) -> None:
    # Nothing listens on port 9: the pull fails at once instead of waiting for a registry.
    spec = ImageSpec("f", ImageSourceKind.IMAGE_REFERENCE, None, None, "127.0.0.1:9/no/such:1")
    with pytest.raises(BuildError, match="cannot pull 127.0.0.1:9/no/such:1"):
        await backend.prepare_image(spec)


async def test_python_function_reads_io_json_and_writes_its_outputs(
    backend: DockerBackend, python_image: str, workdir: Path, tmp_path: Path,
    cleanup_images: list[str],
) -> None:
    train = (
        "import json, sys\n"
        "io = json.load(open(sys.argv[-1]))\n"
        "inputs = {i['identifier']: i['path'] for i in io['inputs']}\n"
        "outputs = {o['identifier']: o['path'] for o in io['outputs']}\n"
        "value = int(open(inputs['model']).read())\n"
        "open(outputs['model'], 'w').write(str(value + 1))\n"
        "open(outputs['performance'], 'w').write('0.5')\n"
        "print('trained', value + 1, flush=True)\n"
    )
    archive = tar_archive(tmp_path / "py.tar.gz", {
        "Dockerfile": f'FROM {python_image}\nCOPY train.py /app/\nENTRYPOINT ["python3"]\n',
        "train.py": train,
    })
    tag = await backend.prepare_image(archive_spec(archive))
    cleanup_images.append(tag)
    result, logs = await run(backend, task(workdir, tag, ["/app/train.py"]))
    assert result.exit_code == 0, logs.text
    assert logs.text.strip() == "trained 42"
    assert (workdir / "output" / "model").read_text() == "42"


def test_choose_backend_picks_docker_when_the_engine_answers(
    docker_engine: docker.DockerClient,
) -> None:
    choice = choose_backend(BackendOptions(docker_client=docker_engine))
    assert choice.backend.name == "docker"
    assert choice.reason.startswith("docker: engine ")


# -- bounding the prepared images -------------------------------------------------------


@pytest.fixture
async def private_backend(
    docker_engine: docker.DockerClient,
) -> AsyncIterator[DockerBackend]:
    """A backend tagging under a repository of its own, so that pruning it cannot touch
    the images of another test (or of another worker sharing the engine)."""
    repository = f"consort-fn-test-{uuid.uuid4().hex[:8]}"
    backend = DockerBackend(docker_engine, image_repository=repository)
    try:
        yield backend
    finally:
        await backend.close()
        for image in docker_engine.images.list():
            for tag in image.tags:
                if tag.startswith(repository + "/"):
                    with contextlib.suppress(docker.errors.ImageNotFound):
                        docker_engine.images.remove(tag, force=True)


async def tiny_function_image(backend: DockerBackend, base: str, tmp_path: Path) -> str:
    """A function image of its own (a distinct layer) on top of the busybox test image."""
    name = uuid.uuid4().hex
    archive = tar_archive(tmp_path / f"{name}.tar.gz", {
        "Dockerfile": f"FROM {base}\nCOPY id.txt /id.txt\n", "id.txt": name})
    return await backend.prepare_image(archive_spec(archive))


def has_image(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


async def test_least_recently_used_function_images_beyond_the_bound_are_pruned(
    private_backend: DockerBackend, busybox_image: str, workdir: Path, tmp_path: Path,
    docker_engine: docker.DockerClient,
) -> None:
    first, second, third = [
        await tiny_function_image(private_backend, busybox_image, tmp_path) for _ in range(3)]
    # Running a task uses the first again: the second is now the least recently used.
    result, logs = await run(private_backend, task(workdir, first, sh("cat /id.txt")))
    assert result.exit_code == 0, logs.text
    for _ in range(50):  # the use is recorded off the task's path
        used = images_lru(private_backend)
        if used[0] == first:
            break
        await asyncio.sleep(0.05)
    assert images_lru(private_backend) == [first, third, second]

    assert await private_backend.prune_images(2) == [second]
    assert not has_image(docker_engine, second)
    assert has_image(docker_engine, first) and has_image(docker_engine, third)
    assert has_image(docker_engine, busybox_image), "an image we did not make was removed"
    assert await private_backend.prune_images(0) == [], "0 means no bound"


def images_lru(backend: DockerBackend) -> list[str]:
    from runner.images import prepared_images

    return [image.tags[0] for image in prepared_images(backend.client, backend.image_repository)]


async def test_images_in_use_or_recently_used_are_kept_beyond_the_bound(
    private_backend: DockerBackend, busybox_image: str, tmp_path: Path,
    docker_engine: docker.DockerClient,
) -> None:
    oldest, in_container, protected, newest = [
        await tiny_function_image(private_backend, busybox_image, tmp_path) for _ in range(4)]
    container = docker_engine.containers.create(in_container, ["true"])  # never started
    try:
        # Recently used: within the grace period nothing goes.
        assert await private_backend.prune_images(1, grace_s=60) == []
        removed = await private_backend.prune_images(1, protect={protected})
        assert removed == [oldest]
        assert has_image(docker_engine, in_container) and has_image(docker_engine, protected)
    finally:
        container.remove(force=True)
    assert sorted(await private_backend.prune_images(1)) == sorted([in_container, protected])
    assert has_image(docker_engine, newest)


async def test_pruning_an_image_with_another_name_only_removes_our_tag(
    private_backend: DockerBackend, busybox_image: str, tmp_path: Path,
    docker_engine: docker.DockerClient,
) -> None:
    # As a loaded tarball keeps the name it was saved with beside our tag.
    shared = await tiny_function_image(private_backend, busybox_image, tmp_path)
    own_name = f"consort-test/someone-elses-{uuid.uuid4().hex[:8]}:1"
    docker_engine.images.get(shared).tag(own_name)
    try:
        await tiny_function_image(private_backend, busybox_image, tmp_path)
        assert await private_backend.prune_images(1) == [shared]
        assert has_image(docker_engine, own_name)
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_engine.images.remove(own_name, force=True)


async def test_build_output_goes_to_the_log_line_by_line_with_a_prefix(
    private_backend: DockerBackend, busybox_image: str, tmp_path: Path,
) -> None:
    archive = tar_archive(tmp_path / "f.tar.gz", {
        "Dockerfile": f"FROM {busybox_image}\nRUN echo building-now\n"})
    logs = Logs()
    await private_backend.prepare_image(archive_spec(archive), logs)
    lines = logs.text.splitlines()
    assert lines and all(line.startswith("[build] ") for line in lines), lines
    assert "[build] building-now" in lines
    assert any("RUN echo building-now" in line for line in lines), lines
