"""Self-describing artifacts: ``_grasp/manifest.json`` inside every artifact folder.

Bookkeeping (the manifest, unit markers) lives in the artifact's ``_grasp/`` folder, which data
tools skip: pyarrow and pandas ignore ``_``-prefixed entries of a dataset folder, and in a Zarr
store ``_grasp`` is an (empty) Zarr group, so listing the store's arrays warns about nothing.

The manifest records the schema version, the stage, the config sections the
artifact depends on (and their hash), the fingerprints of the artifacts it was
made from, seeds, the package version and the creation time. Its
``fingerprint`` is what later artifacts record as their input; when an input is
rebuilt differently, everything made from it becomes stale and is refused
(``StaleError``) unless the user passes ``--force``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grasp_cli import __version__
from grasp_cli.artifacts.atomic import atomic_write_text
from grasp_cli.artifacts.layout import ARTIFACTS, BOOKKEEPING, MANIFEST_NAME, RunLayout
from grasp_cli.config import GraspConfig, sections_hash, semantic_section
from grasp_cli.errors import InputError, StaleError

SCHEMA_VERSION = 2
_ZARR_GROUP = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'


@dataclass
class Manifest:
    artifact: str
    stage: str
    config_hash: str
    config: dict[str, Any]
    inputs: dict[str, str]
    seeds: dict[str, int] = field(default_factory=dict)
    content: str = ""  # digest of the artifact's own bytes, where cheap to compute
    extra: dict[str, Any] = field(default_factory=dict)
    complete: bool = True
    schema_version: int = SCHEMA_VERSION
    package_version: str = __version__
    created: str = ""
    fingerprint: str = ""

    def compute_fingerprint(self) -> str:
        payload = json.dumps(
            [
                self.schema_version,
                self.artifact,
                self.config_hash,
                self.inputs,
                self.seeds,
                self.content,
            ],
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:20]


def build_manifest(
    layout: RunLayout,
    artifact: str,
    config: GraspConfig,
    *,
    seeds: dict[str, int] | None = None,
    content: str = "",
    extra: dict[str, Any] | None = None,
    complete: bool = True,
) -> Manifest:
    """A manifest for ``artifact`` made now from the current input artifacts and config."""
    stage, sections, input_names = ARTIFACTS[artifact]
    inputs = {}
    for name in input_names:
        upstream = read_manifest(layout.path(name))
        if upstream is not None:
            inputs[name] = upstream.fingerprint
    manifest = Manifest(
        artifact=artifact,
        stage=stage,
        config_hash=sections_hash(config, sections),
        config={name: semantic_section(config, name) for name in sections},
        inputs=inputs,
        seeds=dict(seeds or {}),
        content=content,
        extra=dict(extra or {}),
        complete=complete,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    manifest.fingerprint = manifest.compute_fingerprint()
    return manifest


def write_manifest(folder: Path, manifest: Manifest) -> None:
    folder = Path(folder)
    if (folder / "zarr.json").is_file() and not (folder / BOOKKEEPING / "zarr.json").is_file():
        atomic_write_text(folder / BOOKKEEPING / "zarr.json", _ZARR_GROUP.decode())
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(asdict(manifest), indent=2, default=str))


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "artifact": str,
    "stage": str,
    "config_hash": str,
    "config": dict,
    "inputs": dict,
    "seeds": dict,
    "content": str,
    "extra": dict,
    "complete": bool,
    "schema_version": int,
    "package_version": str,
    "created": str,
    "fingerprint": str,
}


class CorruptManifestError(InputError):
    """A ``manifest.json`` that cannot be trusted: unreadable, not JSON, or fields of the wrong type."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        folder = self.path.parent
        stage = stage_of_folder(folder.parent if folder.name == BOOKKEEPING else folder)
        fix = f"rebuild it with `grasp {stage} --force`" if stage else "rebuild the artifact"
        super().__init__(f"{self.path}: corrupt manifest ({reason}); {fix}")


def stage_of_folder(folder: Path) -> str | None:
    """The stage that writes the artifact folder ``folder`` (by its name in a run), if any."""
    for name, (stage, _, _) in ARTIFACTS.items():
        if RunLayout(Path(folder).parent).path(name).name == Path(folder).name:
            return stage
    return None


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of an artifact folder; None when there is none (missing or unfinished).

    Every field is type-checked (``"complete": "false"`` is not ``False``): a manifest that is
    not exactly what grasp writes raises ``CorruptManifestError`` instead of being half-trusted.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptManifestError(path, f"not JSON: {exc}") from None
    except OSError as exc:
        raise CorruptManifestError(path, f"unreadable: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise CorruptManifestError(path, "not a JSON object")
    unknown = sorted(set(raw) - set(_FIELD_TYPES))
    if unknown:
        raise CorruptManifestError(path, f"unknown fields {unknown}")
    for name, expected in _FIELD_TYPES.items():
        if name not in raw:
            if name in ("artifact", "stage", "config_hash", "config", "inputs", "fingerprint"):
                raise CorruptManifestError(path, f"missing field {name!r}")
            continue
        value = raw[name]
        wrong_bool = expected is int and isinstance(value, bool)
        if not isinstance(value, expected) or wrong_bool:
            raise CorruptManifestError(
                path,
                f"field {name!r} is {type(value).__name__} {value!r:.40}, expected {expected.__name__}",
            )
    return Manifest(**raw)


def read_manifest_or_none(folder: Path, *, force: bool) -> Manifest | None:
    """For the stage that *rebuilds* ``folder``: its manifest, or None when it is corrupt and
    ``force`` says to rebuild; without ``force`` a corrupt manifest is an error saying so."""
    try:
        return read_manifest(folder)
    except CorruptManifestError:
        if force:
            return None
        raise


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    changes = []
    for section in sorted(set(old) | set(new)):
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"{section}.{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return "; ".join(changes[:4]) + (" ..." if len(changes) > 4 else "")


def staleness(layout: RunLayout, artifact: str, config: GraspConfig) -> str | None:
    """Why ``artifact`` no longer matches its inputs or config, or None if it is fresh."""
    manifest = read_manifest(layout.path(artifact))
    if manifest is None:
        return None
    stage, sections, input_names = ARTIFACTS[artifact]
    for name in input_names:
        upstream = read_manifest(layout.path(name))
        recorded = manifest.inputs.get(name)
        if upstream is None or recorded is None:
            continue
        if upstream.fingerprint != recorded:
            return f"{artifact} was made from an older {name}"
    # [prepare] is partly given as flags of `grasp prepare`: RUN/config.toml records them, so
    # a later stage (or status) compares the recorded corpus recipe with the config it runs
    # with, and an edited [prepare] shows as a stale corpus.
    # A key the record lacks counts at its default: a grasp that gained a setting (whose
    # default keeps the old behaviour) does not make every earlier artifact stale.
    defaults = type(config)()
    now = {name: semantic_section(config, name) for name in sections}
    before = {
        name: {**semantic_section(defaults, name), **manifest.config.get(name, {})}
        for name in sections
    }
    if now != before:
        return f"{artifact} was made with another config ({_config_diff(before, now)})"
    return None


def require(
    layout: RunLayout,
    artifact: str,
    config: GraspConfig,
    *,
    force: bool = False,
    check_config: bool = True,
) -> Manifest:
    """The manifest of a complete, fresh input artifact; otherwise a one-line error for the user."""
    folder = layout.path(artifact)
    stage = ARTIFACTS[artifact][0]
    manifest = read_manifest(folder)
    if manifest is None:
        raise InputError(
            f"missing: {folder} does not exist or is incomplete; run `grasp {stage}` first"
        )
    if not manifest.complete:
        raise InputError(
            f"incomplete: {folder} has unfinished shards; rerun `grasp {stage}` (see `grasp status`)"
        )
    if manifest.schema_version != SCHEMA_VERSION:
        raise StaleError(
            f"stale: {folder} has schema version {manifest.schema_version}, this grasp reads {SCHEMA_VERSION}"
        )
    reason = staleness(layout, artifact, config) if check_config else None
    if reason and not force:
        raise StaleError(f"stale: {reason}; rerun `grasp {stage}` or pass --force to use it anyway")
    if artifact in PREPARED_PAIR:
        check_prepared_pair(layout)
    return manifest


PREPARED_PAIR = ("corpus", "tasks")


def check_prepared_pair(layout: RunLayout) -> None:
    """Corpus and tasks must come from the same ``grasp prepare`` run.

    prepare writes one ``prepare_id`` into both manifests before it swaps either folder in;
    a prepare killed between the two swaps leaves ids that differ (or a folder missing), which
    would otherwise pair a new corpus with the old tasks (held-out documents inside the corpus).
    """
    manifests = {name: read_manifest(layout.path(name)) for name in PREPARED_PAIR}
    if any(m is None for m in manifests.values()):
        return  # the missing one is reported by whoever requires it
    ids = {name: m.extra.get("prepare_id") for name, m in manifests.items()}
    if ids["corpus"] != ids["tasks"]:
        raise InputError(
            f"{layout.corpus} and {layout.tasks} come from different `grasp prepare` runs "
            "(was one interrupted?); rerun `grasp prepare`"
        )


def folder_digest(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file in an artifact folder, except its
    bookkeeping (``_grasp/``): the ``content`` of artifacts written whole."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith(f"{BOOKKEEPING}/"):
            continue
        digest.update(relative.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def file_digest(paths: list[Path]) -> str:
    """sha256 over the names and bytes of ``paths`` (sorted)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:20]
