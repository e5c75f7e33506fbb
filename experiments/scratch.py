"""Experiments work in a scratch folder beside a finished run, which they only read: what they reuse of the run
(data, a round's embeddings, prompts, ...) is linked in, not copied."""

from __future__ import annotations

from pathlib import Path


def link_from_run(run: Path, scratch: Path, *parts: str) -> None:
    """Link each ``part`` (a path relative to the run folder) into ``scratch`` at the same place, unless it is there."""
    for part in parts:
        link = scratch / part
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((run / part).resolve(), target_is_directory=(run / part).is_dir())
