"""Typed configs, one dataclass per stage, nested in one pipeline config.

Values are validated when a config is built, so a bad value fails at load time
with a message naming the field (``data.n_users must be >= 1, got 0``).
Configs load from TOML (``[data]`` section and so on); unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from dpo4rec.errors import InputError


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise InputError(f"{name} must be {rule}, got {value!r}")


@dataclass
class DataConfig:
    """The data stage: which data set, which users, and the re-rank protocol."""

    dataset: str = "ml-1m"
    """A built-in name (ml-1m, ml-100k, amazon-beauty) or a folder."""
    path: str | None = None
    """Folder with the data set's files, for names whose files are not built in."""
    n_users: int | None = None
    """Seeded random subset of the eligible users, taken before the split; None = all."""
    seed: int = 0
    """Seed for the user subset, the split, negatives and list shuffling."""
    prompt_history_max: int | None = None
    """Cap on prompt-history length; None = the data set's default (30, 15 for Amazon)."""
    positives_per_list: int = 4
    """Consecutive interactions per re-rank list."""
    list_size: int = 10
    """Candidates per list: the chunk plus sampled negatives."""
    recent_history: int = 10
    """Interactions before each list that the recommender sees."""
    positive_rating: float | str = "auto"
    """Label rule: "auto" = the data set's default, "all" = every interaction is
    positive, a number r = rating > r is positive."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train / validation / test fractions of users."""

    def __post_init__(self) -> None:
        _check(bool(str(self.dataset).strip()), "data.dataset", "a name or folder", self.dataset)
        _check(self.n_users is None or self.n_users >= 1, "data.n_users", ">= 1", self.n_users)
        _check(self.prompt_history_max is None or self.prompt_history_max >= 1, "data.prompt_history_max", ">= 1", self.prompt_history_max)
        _check(self.positives_per_list >= 1, "data.positives_per_list", ">= 1", self.positives_per_list)
        _check(self.list_size > self.positives_per_list, "data.list_size", "> data.positives_per_list", self.list_size)
        _check(self.recent_history >= 1, "data.recent_history", ">= 1", self.recent_history)
        _check(
            self.positive_rating in ("auto", "all") or isinstance(self.positive_rating, (int, float)),
            "data.positive_rating", '"auto", "all" or a number', self.positive_rating,
        )
        self.split = tuple(float(x) for x in self.split)
        _check(
            len(self.split) == 3 and all(x > 0 for x in self.split) and abs(sum(self.split) - 1) < 1e-6,
            "data.split", "three positive fractions summing to 1", self.split,
        )


@dataclass
class PipelineConfig:
    """Everything one run needs; each stage reads its own section."""

    data: DataConfig = field(default_factory=DataConfig)


def from_dict(cls: type, values: dict, where: str) -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise InputError(f"{where} must be a table, got {values!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown config key {where}.{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Accept ``value`` if it fits ``hint`` (int for float, list for tuple)."""
    options = get_args(hint) if get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool) and isinstance(value, option):
            return value
        if get_origin(option) is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    raise InputError(f"{name} has the wrong type: {value!r}")


def load_config(path: str | Path | None = None, overrides: dict[str, dict] | None = None) -> PipelineConfig:
    """Read a TOML config (or the defaults) and apply ``{section: {key: value}}`` overrides."""
    values: dict[str, dict] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise InputError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path}: not valid TOML ({exc})") from None
    for section, entries in (overrides or {}).items():
        values.setdefault(section, {}).update({k: v for k, v in entries.items() if v is not None})
    try:
        return from_dict(PipelineConfig, values, "config")
    except InputError as exc:
        raise InputError(f"{where}: {exc}" if path is not None else str(exc)) from None


def to_dict(config: Any) -> dict:
    """A config as plain data, for manifests and reports."""
    return dataclasses.asdict(config)
