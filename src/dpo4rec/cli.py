"""The ``dpo4rec`` command: parse arguments, call one library function.

Bad input (``InputError``) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
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

    run = commands.add_parser("run", help="run (or resume) every stage and every round, then write the report")
    _add_data_options(run)
    run.add_argument("--out", default=DEFAULT_RUN_DIR, help=f"run folder (default {DEFAULT_RUN_DIR})")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config value, TOML syntax (e.g. --set align.beta=0.1 --set run.rounds=3)")
    _add_round_parsers(commands)
    compare = commands.add_parser("compare", help="two finished runs side by side: validation MAP@5, test metrics, A - B with 95%% CIs")
    compare.add_argument("run_a", help="run folder A")
    compare.add_argument("run_b", help="run folder B (same data config: the same test lists)")
    compare.add_argument("--json", help="also write the comparison to this JSON file")
    _add_generate_parsers(commands)
    _add_encode_parser(commands)
    _add_recommend_parser(commands)
    return parser


def _add_round_parsers(commands) -> None:
    """Stages after the recommender, one round at a time (what ``run`` chains)."""
    helps = {
        "reward": "score every sampled text of the train users, write best-vs-worst preference pairs",
        "align": "DPO (TRL + LoRA) on a round's preference pairs",
        "report": "test metrics of every arm with paired bootstrap intervals, plots, report.md",
    }
    for name, text in helps.items():
        parser = commands.add_parser(name, help=text)
        parser.add_argument("--config", help="TOML config file (default: the run folder's config.json)")
        parser.add_argument("--out", default=DEFAULT_RUN_DIR, help=f"run folder (default {DEFAULT_RUN_DIR})")
        if name != "report":
            parser.add_argument("--round", type=int, default=0, help="round (0 = the base LLM's texts)")


def _add_generate_parsers(commands) -> None:
    prompts = commands.add_parser("prompts", help="write one LLM prompt per user from the prompt history")
    generate = commands.add_parser("generate", help="sample greedy + N knowledge texts per user (runs data and prompts first if needed)")
    for parser in (prompts, generate):
        _add_data_options(parser)
        parser.add_argument("--out", default=DEFAULT_RUN_DIR, help=f"run folder (default {DEFAULT_RUN_DIR})")
        parser.add_argument("--model", help="smollm2-135m (default), a .gguf file, a Hugging Face folder or hub name")
    generate.add_argument("--round", type=int, default=0, help="round number (0 = base LLM)")
    generate.add_argument("--adapter", action="append", default=[], help="LoRA adapter folder to merge in (a DPO round's adapter/); repeat for a chain")
    generate.add_argument("--n", type=int, dest="n_samples", help="sampled texts per train user (default 10)")
    generate.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float, dest="top_p")
    generate.add_argument("--backend", choices=("auto", "fast", "hf", "vllm"))
    generate.add_argument("--processes", type=int, help="processes that share the batches (one per GPU; default 1)")


def _add_encode_parser(commands) -> None:
    encode = commands.add_parser("encode", help="encode a round's knowledge texts and the item texts to vectors")
    encode.add_argument("--config", help="TOML config file (sections per stage)")
    encode.add_argument("--out", default=DEFAULT_RUN_DIR, help=f"run folder (default {DEFAULT_RUN_DIR})")
    encode.add_argument("--round", type=int, default=0, help="round whose knowledge to encode (0 = base LLM)")
    encode.add_argument("--encoder", help="sentence-transformers model (default all-MiniLM-L6-v2, offline)")
    encode.add_argument("--batch-size", type=int, dest="batch_size", help="texts per encoder pass")
    encode.add_argument("--long-texts", dest="long_texts", choices=("chunk", "truncate", "error"), help="texts past the encoder's limit")


def _add_recommend_parser(commands) -> None:
    recommend = commands.add_parser("recommend", help="train and evaluate a (knowledge-augmented) re-ranker")
    recommend.add_argument("--config", help="TOML config file (sections per stage)")
    recommend.add_argument("--out", default=DEFAULT_RUN_DIR, help=f"run folder (default {DEFAULT_RUN_DIR})")
    recommend.add_argument("--round", type=int, default=0, help="round whose embeddings to use")
    recommend.add_argument("--backbone", help="dlcm, prm or setrank")
    recommend.add_argument("--no-knowledge", dest="knowledge", action="store_const", const=False, help="the ID-only baseline")
    recommend.add_argument("--epochs", type=int, dest="max_epochs", help="most training epochs")
    recommend.add_argument("--seed", type=int, help="seed for initialization and batch order")
    recommend.add_argument("--device", help="auto, cpu or cuda")


def _data_stage(args: argparse.Namespace) -> int:
    from dpo4rec.config import load_config
    from dpo4rec.data.stage import run_data_stage

    overrides = {"data": {k: getattr(args, k) for k in ("dataset", "path", "n_users", "seed")}}
    config = load_config(args.config, overrides)
    result = run_data_stage(config.data, args.out)
    print(format_summary(result.summary))
    print(f"{'reused' if result.reused else 'wrote'} {result.folder}")
    return 0


def _generate_stages(args: argparse.Namespace) -> int:
    """data -> prompts (-> generate): each reused when its output is already there."""
    from dpo4rec.config import load_config
    from dpo4rec.data.stage import run_data_stage
    from dpo4rec.prompts.stage import run_prompt_stage

    overrides = {
        "data": {k: getattr(args, k) for k in ("dataset", "path", "n_users", "seed")},
        "model": {"name": args.model},
    }
    if args.command == "generate":
        overrides["generate"] = {k: getattr(args, k) for k in ("n_samples", "max_new_tokens", "temperature", "top_p", "backend", "processes")}
    config = load_config(args.config, overrides)
    run_data_stage(config.data, args.out)
    prompts = run_prompt_stage(args.out, config.prompts, config.model)
    s = prompts.summary
    print(f"prompts: {s['users']:,} users, {s['prompt_tokens_mean']:.0f} tokens on average (max {s['prompt_tokens_max']}), "
          f"{s['users_truncated']:,} shortened to fit")
    if args.command == "prompts":
        print(f"{'reused' if prompts.reused else 'wrote'} {prompts.folder}")
        return 0
    from dpo4rec.generate.stage import run_generate_stage
    from dpo4rec.run import round_generate_config

    result = run_generate_stage(args.out, args.round, config.model, round_generate_config(config, args.round), adapters=args.adapter)
    s = result.summary
    print(f"knowledge: {s['texts']:,} texts for {s['users']:,} users ({s['sampled_texts']:,} sampled), "
          f"{s['mean_tokens']:.0f} tokens on average, {s['stopped_at_eos']:.0%} ended at EOS, {s['empty_texts']} empty")
    print(f"{'reused' if result.reused else 'wrote'} {result.folder}")
    return 0


def _encode_stage(args: argparse.Namespace) -> int:
    from dpo4rec.config import load_config
    from dpo4rec.encode.stage import run_encode_stage

    config = load_config(args.config, {"encode": {k: getattr(args, k) for k in ("encoder", "batch_size", "long_texts")}})
    result = run_encode_stage(config.encode, args.out, args.round)
    s = result.summary
    print(f"{s['user_texts']:,} knowledge texts of {s['users']:,} users and {s['items']:,} items -> {s['dim']}-d vectors ({s['encoder']})")
    long = s["long_texts"]
    print(f"texts longer than {s['max_seq_length']} tokens: {long['user_texts']:,} knowledge, {long['item_texts']:,} item ({long['policy']})")
    print(f"{'reused' if result.reused else 'wrote'} {result.folder}")
    return 0


def _recommend_stage(args: argparse.Namespace) -> int:
    from dpo4rec.config import load_config
    from dpo4rec.recommend.stage import run_recommend_stage

    keys = ("backbone", "knowledge", "max_epochs", "seed", "device")
    config = load_config(args.config, {"recommend": {k: getattr(args, k) for k in keys}})
    result = run_recommend_stage(config.recommend, args.out, args.round)
    print(format_rerank_table(result.metrics))
    print(f"{'reused' if result.reused else 'wrote'} {result.folder}")
    return 0


def format_rerank_table(metrics: dict) -> str:
    """Test MAP/NDCG@K of a trained re-ranker beside the random and popularity rankings."""
    rows = [(f"{metrics['model']}{'' if metrics['knowledge'] else ' (no knowledge)'}", metrics["test"])]
    rows += [(name, values) for name, values in metrics["baselines"].items()]
    names = [k for k in metrics["test"] if k.endswith(("@1", "@3", "@5", "@7"))]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'test lists':<{width}}  " + "  ".join(f"{n:>7}" for n in names)]
    lines += [f"{label:<{width}}  " + "  ".join(f"{values[n]:7.4f}" for n in names) for label, values in rows]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from dpo4rec.config import load_config
    from dpo4rec.run import run_pipeline

    config_file = args.config or Path(__file__).parent / "configs" / "default.toml"
    overrides = parse_sets(args.set)
    overrides.setdefault("data", {}).update({k: getattr(args, k) for k in ("dataset", "path", "n_users", "seed") if getattr(args, k) is not None})
    config = load_config(config_file, overrides)
    report = run_pipeline(config, args.out)
    print(f"report: {report / 'report.md'}")
    return 0


def parse_sets(values: list[str]) -> dict[str, dict]:
    """``["align.beta=0.1"]`` -> ``{"align": {"beta": 0.1}}``; values in TOML syntax, bare words as strings."""
    import tomllib

    overrides: dict[str, dict] = {}
    for item in values:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise InputError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. align.beta=0.1")
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()  # a bare word: held_out, prm, cpu ...
        overrides.setdefault(section, {})[name] = parsed
    return overrides


def _round_stage(args: argparse.Namespace) -> int:
    """reward / align / report on a run folder, with the config the run was made with."""
    from dpo4rec.config import load_config
    from dpo4rec.run import load_run_config, train_reward_recommender

    config = load_config(args.config) if args.config else load_run_config(args.out)
    if args.command == "report":
        from dpo4rec.report import write_report

        print(f"report: {write_report(args.out, config) / 'report.md'}")
        return 0
    if args.command == "reward":
        from dpo4rec.align.reward_stage import run_reward_stage

        train_reward_recommender(config, args.out, args.round)
        folder, summary, reused = run_reward_stage(args.out, args.round, config.recommend, config.align)
        train, spread = summary["train"], summary["train"]["spread"]
        print(f"{summary['reward']} rewards on {summary['reward_lists'].replace('_', '-')} lists of {train['sampled_users']:,} sampled train users: "
              f"best - worst {spread['best_minus_worst_mean']:.4f} on average, {spread['users_with_tied_samples']:,} users tied; "
              f"{train['pairs']:,} pairs ({summary['pairing']}); {summary['validation']['pairs']:,} held-out validation pairs")
    else:
        from dpo4rec.align.dpo import adapter_chain, run_align_stage
        from dpo4rec.runlock import launch_rank

        adapter_chain(args.out, args.round)  # rounds before this one must be aligned
        folder, history, reused = run_align_stage(args.out, args.round, config.model, config.align)
        if launch_rank() > 0:  # rank 0 reports what the launch wrote
            return 0
        last = history["steps"][-1] if history["steps"] else {}
        print(f"DPO on {history['pairs']:,} pairs, {len(history['steps'])} steps; last step: loss {last.get('loss', float('nan')):.4f}, "
              f"reward accuracy {last.get('rewards/accuracies', float('nan')):.2f}; reference: {history['reference']}")
    print(f"{'reused' if reused else 'wrote'} {folder}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from dpo4rec.artifacts import write_json
    from dpo4rec.report.compare import compare_runs, format_comparison

    result = compare_runs(args.run_a, args.run_b)
    print(format_comparison(result))
    if args.json:
        write_json(Path(args.json), result)
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


# commands that read a finished stage's output first: they never create a run folder
_NEEDS_RUN_FOLDER = ("encode", "recommend", "reward", "align", "report")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="dpo4rec: %(message)s")
    try:
        if args.command == "data" and args.data_command == "download":
            return _download(args)
        if args.command == "compare":
            return _compare(args)
        if args.command in _NEEDS_RUN_FOLDER and not Path(args.out).is_dir():
            raise InputError(f"{args.out}: no such run folder; run 'dpo4rec run --out {args.out}' first")
        from dpo4rec.runlock import RunLock, launch_rank, launched

        if launched():  # started by accelerate launch / torchrun
            if args.command != "align":
                raise InputError(f"only 'dpo4rec align' runs as several processes (accelerate launch); run '{args.command}' alone")
            if launch_rank() > 0 or os.environ.get("DPO4REC_RUN_LOCKED"):
                return _dispatch(args)  # rank 0 holds the lock (or the `dpo4rec run` that launched it); the others train along
        with RunLock(args.out):
            return _dispatch(args)
    except InputError as exc:
        print(f"dpo4rec: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, a path that is a file: the user's to fix, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dpo4rec: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpo4rec: interrupted; finished work is kept", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    """The commands that write into a run folder (called holding its lock)."""
    if args.command in ("prompts", "generate"):
        return _generate_stages(args)
    if args.command == "encode":
        return _encode_stage(args)
    if args.command == "recommend":
        return _recommend_stage(args)
    if args.command == "run":
        return _run(args)
    if args.command in ("reward", "align", "report"):
        return _round_stage(args)
    return _data_stage(args)


if __name__ == "__main__":
    sys.exit(main())
