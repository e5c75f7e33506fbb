"""Which config a command runs with, and the run folder's record of it (``RUN/config.json``).

One rule for every command: a run folder with a record runs with that record
(``--set`` may repeat a recorded value, or change one of the fields that only
say how far or how spread the work is; anything else is refused in one line
naming the ``--set``); a folder without one starts from ``--config``, or the
packaged default config (what ``dpo4rec run`` does with no options), plus
``--set``. The record is written once the command's first stage has finished,
so a command that fails before that leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

from dpo4rec.artifacts import first_difference, read_json, write_json
from dpo4rec.config import GenerateConfig, PipelineConfig, closest_key, coerce, from_dict, load_config, to_dict
from dpo4rec.errors import InputError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"
"""What every command starts from when neither ``--config`` nor a run folder's record says otherwise."""
RECORD = "config.json"


def resolve_config(run_dir: str | Path, config_file: str | Path | None = None,
                   overrides: dict[str, dict] | None = None, spelled: dict[str, str] | None = None) -> PipelineConfig:
    """The config a command on ``run_dir`` runs with (see the module docstring). ``spelled`` names how the user
    gave an override ("data.n_users" -> "--users 50"); the rest came as ``--set SECTION.KEY=VALUE``."""
    overrides = {section: {k: v for k, v in entries.items() if v is not None} for section, entries in (overrides or {}).items()}
    spelled = spelled or {}

    def given(section: str, key: str, value) -> str:
        return spelled.get(f"{section}.{key}") or f"--set {section}.{key}={_toml(value)}"

    hints = typing.get_type_hints(PipelineConfig)
    sections = {f.name for f in dataclasses.fields(PipelineConfig)}
    for section, entries in overrides.items():
        if section not in sections:
            key, value = next(iter(entries.items()))
            raise InputError(f"{given(section, key, value)}: no config section [{section}]"
                             f"{closest_key(section, sections)}")
        known = {f.name for f in dataclasses.fields(hints[section])}
        for key, value in entries.items():
            if key not in known:
                raise InputError(f"{given(section, key, value)}: no setting {section}.{key}{closest_key(key, known)}")
        field_hints = typing.get_type_hints(hints[section])
        for key, value in entries.items():
            try:
                coerce(value, field_hints[key], f"{section}.{key}")
            except InputError as exc:  # a wrong type: name the option that gave it
                raise InputError(f"{given(section, key, value)}: {exc}") from None
    try:
        return _resolve(run_dir, config_file, overrides, given)
    except InputError as exc:  # a value an override made impossible: name the override, not a file the user never wrote
        for section, entries in overrides.items():
            for key, value in entries.items():
                if f"{section}.{key}" in exc.fields:
                    raise InputError(f"{given(section, key, value)}: {exc.detail}") from None
        raise


def _resolve(run_dir, config_file, overrides, given) -> PipelineConfig:
    record = Path(run_dir) / RECORD
    if not record.is_file():
        return load_config(config_file or DEFAULT_CONFIG, overrides)
    recorded = load_run_config(run_dir)
    if config_file is not None:
        config = load_config(config_file, overrides)
        _refuse_other(recorded, config, run_dir, f"--config {config_file}")
        return config
    values = to_dict(recorded)
    for section, entries in overrides.items():
        values[section].update(entries)
    config = from_dict(PipelineConfig, values, "config")
    theirs, mine = _comparable(_plain(recorded)), _comparable(_plain(config))
    for section, entries in overrides.items():  # only the overridden keys can differ
        for key, value in entries.items():
            if theirs[section].get(key) != mine[section].get(key):
                raise InputError(f"{given(section, key, value)}: {run_dir} was made with {section}.{key} = {theirs[section][key]!r}; "
                                 "leave it out, or choose another --out")
    return config


def record_config(run_dir: str | Path, config: PipelineConfig, write: bool = True) -> None:
    """Write (or update) ``RUN/config.json``, refusing a folder made with another config (``write=False``: only check)."""
    record = Path(run_dir) / RECORD
    if record.is_file():
        _refuse_other(load_run_config(run_dir), config, run_dir, "this command")
    if write:
        write_json(record, _plain(config))


def load_run_config(run_dir: str | Path) -> PipelineConfig:
    """The config a run folder was made with (``RUN/config.json``)."""
    record = Path(run_dir) / RECORD
    if not record.is_file():
        raise InputError(f"{record} not found: pass --config, or run 'dpo4rec run --out {run_dir}' first")
    try:
        return from_dict(PipelineConfig, read_json(record), "config")
    except (OSError, ValueError) as exc:
        raise InputError(f"{record}: unreadable ({exc}); start a new --out") from None
    except InputError as exc:
        raise InputError(f"{record}: {exc} (made by an older dpo4rec? start a new --out)") from None


def _refuse_other(recorded: PipelineConfig, config: PipelineConfig, run_dir: str | Path, source: str) -> None:
    theirs, mine = _comparable(_plain(recorded)), _comparable(_plain(config))
    if theirs != mine:
        raise InputError(f"{run_dir} was made with another config than {source} ({first_difference(theirs, mine, 'config')}); "
                         "choose another --out folder or remove it")


def _plain(config: PipelineConfig) -> dict:
    """A config as its record holds it (tuples become lists)."""
    return json.loads(json.dumps(to_dict(config)))


def _comparable(record: dict) -> dict:
    """A config record without what may change between a run and its continuation: the number of rounds, and
    the number of processes (texts and training do not depend on it)."""
    generate = {k: v for k, v in record.get("generate", {}).items() if k not in GenerateConfig.SPREAD_ONLY}
    return {**record, "run": {**record.get("run", {}), "rounds": None}, "generate": generate}


def _toml(value) -> str:
    return json.dumps(value) if isinstance(value, (str, bool)) else repr(value)
