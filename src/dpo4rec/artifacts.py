"""Run folders, manifests and atomic writes.

A stage writes its whole output folder under a temporary name and renames it
into place only when every file is complete, so a crash leaves either the old
folder or nothing, never half a folder. Each folder carries ``manifest.json``
(schema version, the stage's config, fingerprints of its inputs, package
version); a stage reuses a folder whose manifest matches and refuses to touch
one that was written by another config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from dpo4rec import __version__
from dpo4rec.errors import InputError

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


def round_dir(run_dir: str | Path, round_index: int) -> Path:
    """``RUN/round_<t>``: where round t's knowledge, embeddings, recommender, preferences and adapter live."""
    return Path(run_dir) / f"round_{round_index}"


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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


def existing_output(folder: Path, manifest: dict) -> bool:
    """True when ``folder`` already holds this exact output; False when absent.

    Raises ``InputError`` when the folder holds output of another config or
    schema: we never overwrite a user's finished work silently.
    """
    folder = Path(folder)
    if not folder.exists():
        return False
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder} exists but has no {MANIFEST}: not a dpo4rec {manifest['stage']} folder; remove it or choose another --out")
    try:
        old = read_json(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc})") from None
    differs = [key for key in ("schema", "stage", "config", "inputs") if old.get(key) != manifest[key]]
    if differs:
        detail = first_difference(old.get(differs[0]), manifest[differs[0]], differs[0])
        raise InputError(
            f"{folder} holds {manifest['stage']} output from another run ({detail}); "
            "choose another --out folder or remove it"
        )
    return True


def first_difference(old: Any, new: Any, key: str) -> str:
    """The first differing leaf, e.g. ``config.generate.batch_rows: 50 there, 256 now``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for field in sorted(set(old) | set(new)):
            if old.get(field) != new.get(field):
                return first_difference(old.get(field), new.get(field), f"{key}.{field}")
    return f"{key}: {old!r} there, {new!r} now"


class StageFolder:
    """Context manager that builds a stage folder under a temporary name.

    >>> with StageFolder(run / "data", manifest) as tmp:
    ...     write_parquet(tmp / "lists.parquet", lists)
    On success the manifest is written last and the folder renamed into
    place; on any error the temporary folder is removed.
    """

    def __init__(self, final: Path, manifest: dict):
        self.final = Path(final)
        self.manifest = manifest
        self.tmp = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.final.parent.glob(f".{self.final.name}.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            write_json(self.tmp / MANIFEST, self.manifest)
            os.rename(self.tmp, self.final)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
