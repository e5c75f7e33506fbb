"""Run folders, manifests and atomic writes.

A stage writes its whole output folder under a temporary name and renames it
into place only when every file is complete, so a crash leaves either the old
folder or nothing, never half a folder. Each folder carries ``manifest.json``
(schema version, the stage's config, fingerprints of its inputs and of its own
output files, package version); a stage reuses a folder whose manifest matches
and whose outputs are intact, rebuilds one whose outputs were damaged, and
refuses to touch one that was written by another config. Reads of parquet,
JSON and safetensors files go through the helpers here, which turn a missing
or damaged file into one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dpo4rec import __version__
from dpo4rec.errors import InputError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


def _atomic_replace(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    _atomic_replace(path, lambda tmp: frame.to_parquet(tmp, index=False))


@dataclass
class StageResult:
    """What every stage returns: its output folder, the summary it wrote there (``summary.json``, a recommender's
    ``metrics.json``, DPO's ``training_log.json``), and whether it reused finished output instead of building it."""

    folder: Path
    summary: dict
    reused: bool


def cache_root() -> Path:
    """Where downloaded data sets and converted models are kept: ``$DPO4REC_CACHE``, else ``~/.cache/dpo4rec``."""
    return Path(os.environ.get("DPO4REC_CACHE") or Path.home() / ".cache" / "dpo4rec")


def round_dir(run_dir: str | Path, round_index: int) -> Path:
    """``RUN/round_<t>``: where round t's knowledge, embeddings, recommender, preferences and adapter live."""
    return Path(run_dir) / f"round_{round_index}"


def _damaged(path: Path, exc: BaseException) -> InputError:
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{path}: not found; run the stage that writes it")
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InputError(f"{path}: damaged or unreadable ({detail}); delete it and rerun the stage that writes it")


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(path, exc) from None


def read_parquet(path: Path, **kwargs) -> pd.DataFrame:
    import pyarrow

    try:
        return pd.read_parquet(path, **kwargs)
    except (OSError, ValueError, pyarrow.ArrowException) as exc:
        raise _damaged(Path(path), exc) from None


def read_safetensors(path: Path, framework: str = "pt") -> dict:
    """All tensors of a safetensors file, as torch tensors ("pt") or numpy arrays ("np")."""
    from safetensors import SafetensorError

    if framework == "pt":
        from safetensors.torch import load_file
    else:
        from safetensors.numpy import load_file
    try:
        return load_file(path)
    except (OSError, ValueError, SafetensorError) as exc:
        raise _damaged(Path(path), exc) from None


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def fingerprint_file(path: Path, algorithm: str = "sha256") -> str:
    """Hash of a file's bytes (sha256: what decides whether an input changed)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_fingerprint(path: Path) -> str:
    """What a finished upstream folder holds (its config, inputs and outputs' hashes), not when it was written:
    a folder rebuilt with the same bytes keeps its fingerprint, so what was built from it stays valid."""
    manifest = read_json(path)
    manifest.pop("created", None)
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def output_fingerprints(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """Size and sha256 of every file a stage wrote (the manifest and paths under ``exclude`` excepted)."""
    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    return {
        name: {"bytes": path.stat().st_size, "sha256": fingerprint_file(path)}
        for name, path in files.items()
        if name != MANIFEST and not name.startswith(exclude)
    }


def damaged_output(folder: Path, outputs: dict[str, dict] | None) -> str | None:
    """What is wrong with a finished folder's files (missing, resized, changed), or None when intact.

    Manifests written before outputs were recorded have none: they are taken as they are.
    """
    for name, record in (outputs or {}).items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{name} has {path.stat().st_size:,} bytes, {record['bytes']:,} when written"
        if fingerprint_file(path) != record["sha256"]:
            return f"{name} changed since it was written"
    return None


def write_manifest(folder: Path, manifest: dict, exclude: tuple[str, ...] = ()) -> None:
    """Record the outputs' fingerprints and write the manifest: last, since it marks the folder complete."""
    write_json(Path(folder) / MANIFEST, {**manifest, "outputs": output_fingerprints(folder, exclude)})


def make_manifest(stage: str, config: dict, inputs: dict[str, str]) -> dict:
    """The record that decides reuse: same schema, config and inputs -> same output."""
    return {
        "schema": SCHEMA_VERSION,
        "stage": stage,
        "config": json.loads(json.dumps(config, default=_json_default)),
        "inputs": dict(sorted(inputs.items())),
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def begin_stage(folder: Path, stage: str, config: dict, inputs: dict[str, str], summary: str = "summary.json",
                may_be_partial: bool = False) -> tuple[dict, StageResult | None]:
    """Every stage's prologue once its inputs are checked: the manifest that decides reuse (config, input fingerprints),
    and the finished output as a ``StageResult`` when ``folder`` already holds it (None: build it; ``existing_output``
    says when another config's output is refused). ``may_be_partial``: a folder without a manifest is an unfinished
    build the stage resumes (generation), not a stranger's folder."""
    manifest = make_manifest(stage, config, inputs)
    if may_be_partial and not (Path(folder) / MANIFEST).is_file():
        return manifest, None
    if existing_output(folder, manifest):
        log.info("%s stage: reusing %s", stage, folder)
        return manifest, StageResult(Path(folder), read_json(Path(folder) / summary), reused=True)
    return manifest, None


def existing_output(folder: Path, manifest: dict) -> bool:
    """True when ``folder`` already holds this exact output, intact; False when absent or damaged.

    A folder whose recorded output files are missing or changed is removed (it
    is rebuilt from the same inputs), with a warning naming the file. Raises
    ``InputError`` when the folder holds output of another config or schema:
    we never overwrite a user's finished work silently.
    """
    folder = Path(folder)
    if not folder.exists():
        return False
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder} exists but has no {MANIFEST}: not a dpo4rec {manifest['stage']} folder; remove it or choose another --out")
    old = read_json(path)
    differs = [key for key in ("schema", "stage", "config", "inputs") if old.get(key) != manifest[key]]
    if differs:
        detail = first_difference(old.get(differs[0]), manifest[differs[0]], differs[0])
        raise InputError(
            f"{folder} holds {manifest['stage']} output from another run ({detail}); "
            "choose another --out folder or remove it"
        )
    damage = damaged_output(folder, old.get("outputs"))
    if damage:
        log.warning("%s: %s; rebuilding it", folder, damage)
        shutil.rmtree(folder)
        return False
    return True


def first_difference(old: Any, new: Any, key: str) -> str:
    """The first differing leaf, e.g. ``config.generate.batch_rows: 50 there, 256 now``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for field in sorted(set(old) | set(new)):
            if field not in old or field not in new:
                return f"{key}.{field}: {'absent' if field not in old else repr(old[field])} there, {'absent' if field not in new else repr(new[field])} now"
            if old[field] != new[field]:
                return first_difference(old[field], new[field], f"{key}.{field}")
    return f"{key}: {old!r} there, {new!r} now"


class StageFolder:
    """Context manager that builds a stage folder under a temporary name.

    >>> with StageFolder(run / "data", manifest) as tmp:
    ...     write_parquet(tmp / "lists.parquet", lists)
    On success the manifest is written last (none when ``manifest`` is None:
    the report, rebuilt on every run) and the folder swapped in for any old
    one; on any error the temporary folder is removed and the old one stays.
    """

    def __init__(self, final: Path, manifest: dict | None):
        self.final = Path(final)
        self.manifest = manifest
        self.tmp = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.final.parent.glob(f".{self.final.name}.tmp-*"):  # left by a killed run
            if not pid_alive(stale.name.rsplit("-", 1)[-1]):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            if self.manifest is not None:
                write_manifest(self.tmp, self.manifest)
            replace_folder(self.tmp, self.final)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def pid_alive(pid: str | int) -> bool:
    """Whether a process with this id runs on this machine (a temporary folder's writer)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def replace_folder(new: Path, final: Path) -> None:
    """Put a complete folder in place of ``final`` (which may exist): the old one is removed only after the swap."""
    new, final = Path(new), Path(final)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)
