"""Fetch and verify public data sets into a cache folder (for users with internet).

The archive is downloaded to a partial file, checked against its published
MD5, unpacked into a temporary folder and only then renamed into place, so an
interrupted or corrupted download never leaves a folder the loaders would read.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from dpo4rec.artifacts import cache_root, fingerprint_file
from dpo4rec.errors import InputError

# GroupLens publishes an MD5 beside each zip (ml-1m.zip.md5).
SOURCES = {
    "ml-1m": {
        "url": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "md5": "c4d9eecfca2ab87c1945afe126590906",
        "inner": "ml-1m",  # the folder inside the zip
    },
}


def cached_dataset_dir(name: str) -> Path | None:
    folder = cache_root() / name
    return folder if folder.is_dir() else None


def download_dataset(name: str, url: str | None = None, md5: str | None = None, force: bool = False) -> Path:
    """Download ``name`` into the cache and return its folder.

    ``url``/``md5`` override the official source (a mirror); pass ``md5=""``
    to skip the check for a mirror whose checksum you do not know.
    """
    if name not in SOURCES:
        raise InputError(f"no download source for {name!r} (known: {', '.join(SOURCES)})")
    source = SOURCES[name]
    url = url or source["url"]
    md5 = source["md5"] if md5 is None else md5
    final = cache_root() / name
    if final.is_dir() and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    archive = final.parent / f"{name}.zip.part"
    try:
        _fetch(url, archive)
        if md5:
            got = fingerprint_file(archive, "md5")  # GroupLens publishes MD5s
            if got != md5.lower():
                raise InputError(f"{url}: checksum mismatch (md5 {got}, expected {md5}); the download was discarded")
        staging = final.parent / f".{name}.unpack-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
        except zipfile.BadZipFile:
            raise InputError(f"{url}: not a zip archive") from None
        inner = staging / source["inner"]
        if not inner.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
            raise InputError(f"{url}: archive has no {source['inner']}/ folder")
        if final.exists():
            shutil.rmtree(final)
        os.rename(inner, final)
        shutil.rmtree(staging, ignore_errors=True)
    finally:
        archive.unlink(missing_ok=True)
    return final


def _fetch(url: str, target: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}") as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(f"{url}: download failed ({getattr(exc, 'reason', exc)})") from None

