"""`consort function|data-manager|sample|dataset|model`: register, read and download assets.

Downloads stream to a `.part` file beside the target and rename it into place when
complete (the client does it), so a failed download leaves nothing behind; an existing
file is only replaced with `--force`.
"""

from __future__ import annotations

import shlex
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import BaseModel

from app.storage.checksums import sample_checksum
from consort._ops import MetadataFilter
from consort._protocol import Progress
from consort.cli._common import (
    JsonOption,
    WhereOption,
    client,
    handled,
    out,
    parse_pairs,
    parse_where,
    permissions,
    print_json,
    show_one,
    show_rows,
    transfer,
)
from consort.client import Client

PublicOption = Annotated[bool, typer.Option("--public", help="Anyone may process it.")]
AuthorizedOption = Annotated[list[str], typer.Option(
    "--authorized", help="Organizations that may process it (repeatable or comma-separated)")]
MetadataOption = Annotated[list[str], typer.Option("--metadata", help="KEY=VALUE (repeatable)")]
OutputOption = Annotated[Path | None, typer.Option(
    "--output", "-o", help="File to write, or a directory to write it in under the name the "
                           "API gives it (default: that name, here)")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace an existing file.")]
SKIPPED = {".git", "__pycache__", ".venv", ".mypy_cache", ".pytest_cache"}


def _reader(
    group: typer.Typer, columns: list[str],
    iterate: Callable[[Client, MetadataFilter | None], Iterator[BaseModel]],
    get: Callable[[Client, str], BaseModel], what: str,
) -> None:
    """`list [--where ...]` and `show KEY` for one kind of asset."""

    @group.command("list", help=f"Every {what} visible to you (filtered by metadata).")
    @handled
    def list_(where: WhereOption = [], as_json: JsonOption = False) -> None:  # noqa: B006
        with client() as api:
            show_rows(iterate(api, parse_where(where)), columns, as_json)

    @group.command("show", help=f"One {what}.")
    @handled
    def show(key: str, as_json: JsonOption = False) -> None:
        with client() as api:
            show_one(get(api, key), as_json)


def _target(output: Path | None, name: str, force: bool) -> Path:
    """Where a download goes; refused up front when a file is there and --force is not
    given (before anything is fetched, so nothing is downloaded for nothing)."""
    target = output if output is not None else Path(name)
    if target.is_dir():
        target = target / name
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists: give --force to replace it")
    return target


def _download(what: str, target: Path,
              fetch: Callable[[Client, Path, Progress], Path]) -> None:
    with client() as api, transfer(f"downloading {what}") as progress:
        fetch(api, target, progress)
    out.print(f"Saved {target}", markup=False)


# --- functions -----------------------------------------------------------------------------

function = typer.Typer(help="Functions (algorithms): an image, a command, inputs, outputs.",
                       no_args_is_help=True)


def _io_specs(values: list[str], kind_of: str) -> dict[str, dict[str, Any]]:
    """NAME:KIND[:multiple][:optional] options into the function's inputs/outputs."""
    specs: dict[str, dict[str, Any]] = {}
    for value in values:
        name, *rest = value.split(":")
        if not name or not rest:
            raise typer.BadParameter(f"{kind_of} must look like NAME:KIND[:multiple]"
                                     f"[:optional], not {value!r}")
        spec: dict[str, Any] = {"kind": rest[0].upper()}
        for flag in rest[1:]:
            if flag not in ("multiple", "optional"):
                raise typer.BadParameter(f"unknown flag {flag!r} in {value!r}")
            spec[flag] = True
        specs[name] = spec
    return specs


def archive_folder(folder: Path, dest: Path) -> Path:
    """The folder as a tar.gz with its files at the root (the Dockerfile among them)."""
    if not (folder / "Dockerfile").is_file():
        raise ValueError(f"{folder} has no Dockerfile: give --image or --image-tarball")

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if SKIPPED & set(Path(info.name).parts) else info

    with tarfile.open(dest, "w:gz") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name, filter=keep)
    return dest


@function.command("add")
@handled
def function_add(
    folder: Annotated[Path | None, typer.Argument(
        help="Folder with a Dockerfile (archived and built by the runners) and optionally "
             "a function.yaml (name, description, inputs, outputs, command, ...)")] = None,
    name: Annotated[str | None, typer.Option("--name")] = None,
    image: Annotated[str | None, typer.Option("--image", help="An image reference")] = None,
    image_tarball: Annotated[Path | None, typer.Option(
        "--image-tarball", help="A `docker save` tarball to upload")] = None,
    command: Annotated[str | None, typer.Option("--command", help="Shell-quoted")] = None,
    entrypoint: Annotated[str | None, typer.Option("--entrypoint", help="Shell-quoted")] = None,
    env: Annotated[list[str], typer.Option("--env", help="K=V (repeatable)")] = [],  # noqa: B006
    inputs: Annotated[list[str], typer.Option(
        "--input", help="NAME:KIND[:multiple][:optional] (repeatable)")] = [],  # noqa: B006
    outputs: Annotated[list[str], typer.Option(
        "--output", help="NAME:KIND[:multiple] (repeatable)")] = [],  # noqa: B006
    gpu: Annotated[bool, typer.Option("--gpu")] = False,
    description: Annotated[str | None, typer.Option("--description")] = None,
    public: PublicOption = False,
    authorized: AuthorizedOption = [],  # noqa: B006
    metadata: MetadataOption = [],  # noqa: B006
    as_json: JsonOption = False,
) -> None:
    """Register a function from a folder, an image tarball or an image reference."""
    spec: dict[str, Any] = {}
    if folder is not None and (folder / "function.yaml").is_file():
        spec = yaml.safe_load((folder / "function.yaml").read_text()) or {}
    spec_inputs = {**spec.get("inputs", {}), **_io_specs(inputs, "--input")}
    spec_outputs = {**spec.get("outputs", {}), **_io_specs(outputs, "--output")}
    argv = shlex.split(command) if command is not None else spec.get("command", [])
    entry = shlex.split(entrypoint) if entrypoint is not None else spec.get("entrypoint")
    fields: dict[str, Any] = {
        "inputs": spec_inputs, "outputs": spec_outputs, "command": argv, "entrypoint": entry,
        "environment": {**spec.get("environment", {}), **parse_pairs(env, "--env")},
        "gpu": gpu or bool(spec.get("gpu", False)),
        "description": description if description is not None else spec.get("description", ""),
        "permissions": permissions(public, authorized) or spec.get("permissions"),
        "metadata": {**spec.get("metadata", {}), **parse_pairs(metadata, "--metadata")},
    }
    title = name or spec.get("name") or (folder.resolve().name if folder else None)
    if title is None:
        raise typer.BadParameter("give --name (or a folder / function.yaml with a name)")
    with client() as api, tempfile.TemporaryDirectory() as tmp:
        if image is not None:
            fields.update(image_source="IMAGE_REFERENCE", image=image)
        elif image_tarball is not None:
            fields.update(image_source="IMAGE_TARBALL", image_file=image_tarball)
        elif folder is not None:
            fields.update(image_source="DOCKERFILE_ARCHIVE",
                          image_file=archive_folder(folder, Path(tmp) / "function.tar.gz"))
        else:
            raise typer.BadParameter("give a folder, --image-tarball or --image")
        with transfer("uploading the function") as progress:
            registered = api.add_function(title, on_progress=progress, **fields)
    _registered(registered, "function", as_json)


def _registered(asset: Any, what: str, as_json: bool) -> None:
    if as_json:
        print_json(asset)
    else:
        out.print(f"Registered {what} {asset.key}", markup=False)


_reader(function, ["key", "name", "owner", "image_source", "image", "created_at"],
        lambda api, where: api.iter_functions(metadata=where),
        lambda api, key: api.get_function(key), "function")


@function.command("download")
@handled
def function_download(key: str, output: OutputOption = None, force: ForceOption = False
                      ) -> None:
    """Download a function's image archive (a Dockerfile archive or `docker save` tarball;
    none for a function given by image reference)."""
    _download("the function archive", _target(output, f"{key}.tar", force),
              lambda api, dest, progress: api.download_function_archive(
                  key, dest, on_progress=progress))


# --- data managers and samples -----------------------------------------------------------

data_manager = typer.Typer(help="Data managers: an opener and who may use the data.",
                           no_args_is_help=True)


@data_manager.command("add")
@handled
def data_manager_add(
    name: Annotated[str, typer.Option("--name")],
    opener: Annotated[Path, typer.Option("--opener", help="The opener (a Python file)",
                                         exists=True, dir_okay=False)],
    description: Annotated[str, typer.Option("--description")] = "",
    public: PublicOption = False,
    authorized: AuthorizedOption = [],  # noqa: B006
    metadata: MetadataOption = [],  # noqa: B006
    as_json: JsonOption = False,
) -> None:
    """Register a data manager (the opener is uploaded)."""
    with client() as api, transfer("uploading the opener") as progress:
        registered = api.add_data_manager(
            name, opener=opener, description=description,
            permissions=permissions(public, authorized),
            metadata=parse_pairs(metadata, "--metadata"), on_progress=progress)
    _registered(registered, "data manager", as_json)


_reader(data_manager, ["key", "name", "owner", "opener_checksum", "created_at"],
        lambda api, where: api.iter_data_managers(metadata=where),
        lambda api, key: api.get_data_manager(key),
        "data manager")


@data_manager.command("download")
@handled
def data_manager_download(key: str, output: OutputOption = None, force: ForceOption = False
                          ) -> None:
    """Download a data manager's opener."""
    _download("the opener", _target(output, "opener.py", force),
              lambda api, dest, progress: api.download_opener(key, dest, on_progress=progress))


sample = typer.Typer(help="Data samples: registered by location; the bytes stay with you.",
                     no_args_is_help=True)


@sample.command("add")
@handled
def sample_add(
    location: Annotated[str, typer.Argument(
        help="A path or URI your runners can read (a local path is checksummed here)")],
    data_managers: Annotated[list[str], typer.Option(
        "--data-manager", help="Data manager key (repeatable)")],
    checksum: Annotated[str | None, typer.Option(
        "--checksum", help="SHA-256 (required when LOCATION is not a local path)")] = None,
    metadata: MetadataOption = [],  # noqa: B006
    as_json: JsonOption = False,
) -> None:
    """Register a data sample by location and checksum."""
    local = Path(location)
    if checksum is None:
        if not local.exists():
            raise typer.BadParameter("LOCATION is not a local path: give --checksum")
        checksum = sample_checksum(local)
        location = str(local.resolve())
    with client() as api:
        registered = api.add_data_sample(data_managers, checksum, location,
                                         metadata=parse_pairs(metadata, "--metadata"))
    _registered(registered, "data sample", as_json)


_reader(sample, ["key", "owner", "data_manager_keys", "location", "created_at"],
        lambda api, where: api.iter_data_samples(metadata=where),
        lambda api, key: api.get_data_sample(key),
        "data sample")

# --- datasets ----------------------------------------------------------------------------

dataset = typer.Typer(help="Datasets (OASIS): named sets of files.", no_args_is_help=True)


@dataset.command("add")
@handled
def dataset_add(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    name: Annotated[str | None, typer.Option("--name", help="Default: the folder's name")] = None,
    public: PublicOption = False,
    authorized: AuthorizedOption = [],  # noqa: B006
    metadata: MetadataOption = [],  # noqa: B006
    as_json: JsonOption = False,
) -> None:
    """Upload every file of a folder and register them as one dataset."""
    files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*"))
             if p.is_file() and not SKIPPED & set(p.relative_to(folder).parts)}
    total = sum(p.stat().st_size for p in files.values())
    with client() as api, transfer(f"uploading {len(files)} files") as progress:
        sent = 0

        def overall(done: int, size: int | None) -> None:
            progress(sent + done, total)

        refs = []
        for path, file in files.items():
            refs.append((path, api.upload_file(file, on_progress=overall).checksum))
            sent += file.stat().st_size
        registered = api.add_dataset(
            name or folder.resolve().name, refs, permissions=permissions(public, authorized),
            metadata=parse_pairs(metadata, "--metadata"))
    _registered(registered, "dataset", as_json)


@dataset.command("download")
@handled
def dataset_download(
    key: str,
    dest: Annotated[Path | None, typer.Argument(help="Same as -o", show_default=False)] = None,
    output: OutputOption = None,
    file: Annotated[str | None, typer.Option(
        "--file", help="Only this file of the dataset (its path in the dataset)")] = None,
    force: ForceOption = False,
) -> None:
    """Download a whole dataset as a zip (its tree preserved), or one of its files."""
    if dest is not None and output is not None and dest != output:
        raise typer.BadParameter("give the destination once: DEST or -o")
    chosen = output if output is not None else dest
    if file is None:
        _download("the dataset", _target(chosen, f"{key}.zip", force),
                  lambda api, path, progress: api.download_dataset_zip(
                      key, path, on_progress=progress))
        return
    path_in_dataset = file
    _download(path_in_dataset, _target(chosen, Path(path_in_dataset).name, force),
              lambda api, path, progress: api.download_dataset_file(
                  key, path_in_dataset, path, on_progress=progress))


_reader(dataset, ["key", "name", "owner", "total_size", "created_at"],
        lambda api, where: api.iter_datasets(metadata=where),
        lambda api, key: api.get_dataset(key), "dataset")


# --- models ------------------------------------------------------------------------------

model = typer.Typer(help="Models: what training and aggregation tasks produce.",
                    no_args_is_help=True)
MODEL_COLUMNS = ["key", "compute_task_key", "identifier", "owner", "size", "disabled",
                 "created_at"]


@model.command("list")
@handled
def model_list(
    task_key: Annotated[str | None, typer.Option("--task", help="Produced by this task")] = None,
    owner: Annotated[str | None, typer.Option("--owner", help="Its worker")] = None,
    as_json: JsonOption = False,
) -> None:
    """Models, oldest first (models carry no metadata: filter by task or worker)."""
    with client() as api:
        show_rows(api.iter_models(compute_task_key=task_key, owner=owner), MODEL_COLUMNS,
                  as_json)


@model.command("show")
@handled
def model_show(key: str, as_json: JsonOption = False) -> None:
    """One model."""
    with client() as api:
        show_one(api.get_model(key), as_json)


@model.command("download")
@handled
def model_download(key: str, output: OutputOption = None, force: ForceOption = False) -> None:
    """Download a model file (process permission, and the worker's export setting unless
    the model is yours)."""
    _download("the model", _target(output, f"{key}.model", force),
              lambda api, dest, progress: api.download_model(key, dest, on_progress=progress))


def install(app: typer.Typer) -> None:
    app.add_typer(function, name="function")
    app.add_typer(data_manager, name="data-manager")
    app.add_typer(sample, name="sample")
    app.add_typer(dataset, name="dataset")
    app.add_typer(model, name="model")
