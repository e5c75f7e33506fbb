"""The ``dpo4rec`` command: parse arguments, call one library function.

Bad input (``InputError``) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dpo4rec.errors import InputError

DEFAULT_RUN_DIR = "runs/default"


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (sections per stage)")
    parser.add_argument("--dataset", help="ml-1m, ml-100k, amazon-beauty, or a folder")
    parser.add_argument("--path", help="folder with the data set's files (amazon-beauty needs it)")
    parser.add_argument("--users", type=int, dest="n_users", help="seeded random subset of eligible users")
    parser.add_argument("--seed", type=int, help="seed for subset, split, negatives, shuffling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo4rec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="load a data set and write the re-rank protocol artifacts")
    _add_data_options(data)
    data.add_argument("--out", default=DEFAULT_RUN_DIR, help=f"run folder (default {DEFAULT_RUN_DIR})")
    data_commands = data.add_subparsers(dest="data_command")
    download = data_commands.add_parser("download", help="fetch and verify a public data set into the cache")
    download.add_argument("name", help="data set to fetch (ml-1m)")
    download.add_argument("--url", help="mirror URL instead of the official one")
    download.add_argument("--md5", help="expected MD5 of the archive ('' skips the check)")
    download.add_argument("--force", action="store_true", help="download again even if cached")

    run = commands.add_parser("run", help="run the pipeline (for now: the data stage) and print a summary")
    _add_data_options(run)
    run.add_argument("--out", default=DEFAULT_RUN_DIR, help=f"run folder (default {DEFAULT_RUN_DIR})")
    return parser


def _data_stage(args: argparse.Namespace) -> int:
    from dpo4rec.config import load_config
    from dpo4rec.data.stage import run_data_stage

    overrides = {"data": {k: getattr(args, k) for k in ("dataset", "path", "n_users", "seed")}}
    config = load_config(args.config, overrides)
    result = run_data_stage(config.data, args.out)
    print(format_summary(result.summary))
    print(f"{'reused' if result.reused else 'wrote'} {result.folder}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from dpo4rec.data.download import download_dataset

    folder = download_dataset(args.name, url=args.url, md5=args.md5, force=args.force)
    print(f"{args.name} is in {folder}")
    return 0


def format_summary(summary: dict) -> str:
    """The data summary as a short, aligned text block."""
    users, lists = summary["users"], summary["lists"]
    rows = [
        ("dataset", summary["dataset"]),
        ("interactions loaded", f"{summary['loaded']['interactions']:,}"),
        ("users loaded", f"{users['loaded']:,}"),
        ("  dropped (< 2 interactions)", f"{users['dropped_fewer_than_2_interactions']:,}"),
        ("  dropped (no complete list)", f"{users['dropped_no_complete_list']:,}"),
        ("users selected", f"{users['selected']:,}  (train {users['train']:,} / validation {users['validation']:,} / test {users['test']:,})"),
        ("items", f"{summary['items']:,}"),
        ("lists", f"{lists['total']:,}  (train {lists['train']:,} / validation {lists['validation']:,} / test {lists['test']:,})"),
        ("positives per list", f"{lists['mean_positives_per_list']:.2f}  ({lists['lists_without_positive']:,} lists without one)"),
        ("prompt history, mean", f"{summary['prompt_history_mean_length']:.1f} items"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="dpo4rec: %(message)s")
    try:
        if args.command == "data" and args.data_command == "download":
            return _download(args)
        return _data_stage(args)
    except InputError as exc:
        print(f"dpo4rec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpo4rec: interrupted; finished work is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
