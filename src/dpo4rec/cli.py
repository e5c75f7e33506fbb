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
DESCRIPTION = """DPO4Rec: an LLM writes each user's preferences, a knowledge-augmented re-ranker scores them,
and DPO aligns the LLM with what the re-ranker (or text matching) prefers. `dpo4rec run` does it all;
the other commands run one stage at a time on the same run folder, in the order listed."""
EPILOG = """every command that writes into a run folder (--out) runs with the folder's config.json once
it has one; a new folder starts from --config (default: the packaged default config, the one
`dpo4rec run` uses) plus --set. Examples:
  dpo4rec run                                     # the default run (ML-1M, 600 users, SmolLM2-135M)
  dpo4rec run --config configs/tiny.toml --out runs/tiny
  dpo4rec data --dataset ml-100k --users 100 --out runs/x && dpo4rec prompts --out runs/x"""


def _defaults():
    """The default config's values, shown in --help (one source: the packaged default config)."""
    from dpo4rec.config import load_config
    from dpo4rec.run_config import DEFAULT_CONFIG

    return load_config(DEFAULT_CONFIG)


def _command(commands, name: str, text: str, example: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=text, description=f"{text}.", epilog=f"example: {example}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def _add_run_folder_options(parser: argparse.ArgumentParser, d) -> None:
    """What every command that runs a stage takes: the run folder, a config file, overrides, the LLM."""
    parser.add_argument("--out", default=DEFAULT_RUN_DIR, help=f"run folder (default: {DEFAULT_RUN_DIR})")
    parser.add_argument("--config", help="TOML config for a new run folder (default: the packaged default config; "
                                         "a folder with config.json runs with that)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, TOML syntax (e.g. --set align.beta=0.1 --set run.rounds=2)")
    _add_model_option(parser, d)


def _add_data_options(parser: argparse.ArgumentParser, d) -> None:
    parser.add_argument("--dataset", help=f"ml-1m, ml-100k, amazon-beauty, or a folder (default: {d.data.dataset})")
    parser.add_argument("--path", help="folder with the data set's files (amazon-beauty needs it)")
    parser.add_argument("--users", type=_users, dest="n_users", metavar="N|all",
                        help=f"seeded random subset of eligible users, or all (default: {d.data.n_users or 'all'})")
    parser.add_argument("--seed", type=int, help=f"seed for subset, split, negatives, shuffling (default: {d.data.seed})")


def _users(value: str):
    """--users: a count, or "all" (unsets data.n_users)."""
    if value.strip().lower() == "all":
        return "none"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of users or all, got {value!r}") from None


def _add_model_option(parser: argparse.ArgumentParser, d) -> None:
    parser.add_argument("--model", help=f"the LLM: smollm2-135m, a .gguf file, a Hugging Face folder or hub name (default: {d.model.name})")


def build_parser() -> argparse.ArgumentParser:
    from dpo4rec import __version__

    d = _defaults()
    parser = argparse.ArgumentParser(prog="dpo4rec", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"dpo4rec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(commands, "run", "run (or resume) every stage of every round, then write the report",
                   f"dpo4rec run --out runs/default   (rounds: {d.run.rounds}, N = {d.generate.n_samples}, reward: {d.align.reward_model})")
    _add_run_folder_options(run, d)
    _add_data_options(run, d)

    data = _command(commands, "data", "load a data set and write the re-rank protocol (users, items, lists)",
                    "dpo4rec data --dataset ml-100k --users 100 --out runs/x")
    _add_run_folder_options(data, d)
    _add_data_options(data, d)
    data_commands = data.add_subparsers(dest="data_command")
    download = data_commands.add_parser("download", help="fetch and verify a public data set into the cache")
    download.add_argument("name", help="data set to fetch (ml-1m)")
    download.add_argument("--url", help="mirror URL instead of the official one")
    download.add_argument("--md5", help="expected MD5 of the archive ('' skips the check)")
    download.add_argument("--force", action="store_true", help="download again even if cached")

    prompts = _command(commands, "prompts", "write one LLM prompt per user from the prompt history (runs data first if needed)",
                       "dpo4rec prompts --out runs/x")
    generate = _command(commands, "generate", "sample a greedy and N knowledge texts per user (runs data and prompts first if needed)",
                        "dpo4rec generate --out runs/x --round 0")
    for parser_ in (prompts, generate):
        _add_run_folder_options(parser_, d)
        _add_data_options(parser_, d)
    g = d.generate
    generate.add_argument("--round", type=int, default=0, help="round (0 = the base LLM; t = with the adapters of rounds 0..t-1)")
    generate.add_argument("--adapter", action="append", default=[], help="LoRA adapter folder to merge in (a DPO round's align/); repeat for a chain")
    generate.add_argument("--n", type=int, dest="n_samples", help=f"sampled texts per sampled user (default: {g.n_samples})")
    generate.add_argument("--max-new-tokens", type=int, dest="max_new_tokens", help=f"tokens per text at most (default: {g.max_new_tokens})")
    generate.add_argument("--temperature", type=float, help=f"sampling temperature (default: {g.temperature})")
    generate.add_argument("--top-p", type=float, dest="top_p", help=f"nucleus sampling mass (default: {g.top_p})")
    generate.add_argument("--backend", choices=("auto", "fast", "hf", "vllm"), help=f"sampler (default: {g.backend})")
    generate.add_argument("--processes", type=int, help=f"processes that share the batches, one per GPU (default: {g.processes})")

    encode = _command(commands, "encode", "encode a round's knowledge texts and the item texts to vectors", "dpo4rec encode --out runs/x --round 0")
    _add_run_folder_options(encode, d)
    encode.add_argument("--round", type=int, default=0, help="round whose knowledge to encode (0 = the base LLM's)")
    encode.add_argument("--encoder", help=f"sentence-transformers model or folder (default: {d.encode.encoder})")
    encode.add_argument("--batch-size", type=int, dest="batch_size", help=f"texts per encoder pass (default: {d.encode.batch_size})")
    encode.add_argument("--long-texts", dest="long_texts", choices=("chunk", "truncate", "error"),
                        help=f"texts past the encoder's limit (default: {d.encode.long_texts})")

    recommend = _command(commands, "recommend", "train and evaluate a (knowledge-augmented) re-ranker on a round's vectors",
                         "dpo4rec recommend --out runs/x --backbone dlcm")
    _add_run_folder_options(recommend, d)
    r = d.recommend
    recommend.add_argument("--round", type=int, default=0, help="round whose vectors to use")
    recommend.add_argument("--backbone", help=f"dlcm, prm or setrank on re-rank data, sasrec on next_item data (default: {r.backbone}); another backbone gets its own folder")
    recommend.add_argument("--no-knowledge", dest="knowledge", action="store_const", const=False, help="the ID-only baseline")
    recommend.add_argument("--epochs", type=int, dest="max_epochs", help=f"most training epochs (default: {r.max_epochs})")
    recommend.add_argument("--seed", type=int, help=f"seed for initialization and batch order (default: {r.seed})")
    recommend.add_argument("--device", help=f"auto, cpu or cuda (default: {r.device})")

    helps = {
        "reward": ("score every sampled text of the train and validation users, write best-vs-worst pairs", "dpo4rec reward --out runs/x --round 0"),
        "align": ("DPO (TRL + LoRA) on a round's preference pairs, then the held-out check on validation users", "dpo4rec align --out runs/x --round 0"),
        "drift": ("a round's texts (t >= 1) under the earlier rounds' rewards: validation and train drift", "dpo4rec drift --out runs/x --round 1"),
        "report": ("test metrics of every arm with paired bootstrap intervals, plots, report.md", "dpo4rec report --out runs/x"),
    }
    for name, (text, example) in helps.items():
        parser_ = _command(commands, name, text, example)
        _add_run_folder_options(parser_, d)
        if name != "report":
            parser_.add_argument("--round", type=int, default=0, help="round (0 = the base LLM's texts)")

    compare = _command(commands, "compare", "two finished runs side by side: validation MAP@5, test metrics, A - B with 95%% CIs",
                       "dpo4rec compare runs/a runs/b")
    compare.add_argument("run_a", help="run folder A")
    compare.add_argument("run_b", help="run folder B (same data config: the same test lists)")
    compare.add_argument("--json", help="also write the comparison to this JSON file")
    return parser


_OPTION_NAMES = {"data.dataset": "--dataset", "data.path": "--path", "data.n_users": "--users", "data.seed": "--seed",
                 "model.name": "--model", "generate.n_samples": "--n", "generate.max_new_tokens": "--max-new-tokens",
                 "generate.temperature": "--temperature", "generate.top_p": "--top-p", "generate.backend": "--backend",
                 "generate.processes": "--processes", "encode.encoder": "--encoder", "encode.batch_size": "--batch-size",
                 "encode.long_texts": "--long-texts"}


def _config(args: argparse.Namespace, overrides: dict[str, dict] | None = None):
    """The config this command runs with: the run folder's record, or --config / the default, plus --set and options."""
    from dpo4rec.run_config import resolve_config

    sets = parse_sets(args.set)
    if getattr(args, "model", None) is not None:
        overrides = {**(overrides or {}), "model": {"name": args.model}}
    spelled = {}
    for section, entries in (overrides or {}).items():
        given = {k: v for k, v in entries.items() if v is not None}
        sets.setdefault(section, {}).update(given)
        spelled.update({f"{section}.{k}": f"{_OPTION_NAMES[f'{section}.{k}']} {v}" for k, v in given.items()})
    return resolve_config(args.out, args.config, sets, spelled)


def _say_where(result) -> None:
    """The last line of every stage command: where its output is, and whether this command made it."""
    print(f"{'reused' if result.reused else 'wrote'} {result.folder}")


def _data_overrides(args: argparse.Namespace) -> dict[str, dict]:
    return {"data": {k: getattr(args, k, None) for k in ("dataset", "path", "n_users", "seed")}}


def _data_stage(args: argparse.Namespace) -> int:
    from dpo4rec.data.stage import run_data_stage
    from dpo4rec.run_config import record_config

    config = _config(args, _data_overrides(args))
    result = run_data_stage(args.out, config.data)
    record_config(args.out, config)
    print(format_summary(result.summary))
    _say_where(result)
    return 0


def _generate_stages(args: argparse.Namespace) -> int:
    """data -> prompts (-> generate): each reused when its output is already there."""
    from dpo4rec.data.stage import run_data_stage
    from dpo4rec.prompts.stage import run_prompt_stage
    from dpo4rec.run_config import record_config

    overrides = _data_overrides(args)
    if args.command == "generate":
        overrides["generate"] = {k: getattr(args, k) for k in ("n_samples", "max_new_tokens", "temperature", "top_p", "backend", "processes")}
    config = _config(args, overrides)
    run_data_stage(args.out, config.data)
    record_config(args.out, config)
    prompts = run_prompt_stage(args.out, config.prompts, config.model)
    s = prompts.summary
    if args.command == "prompts" or not prompts.reused:  # generate on a run with prompts: only its own summary
        print(f"prompts: {s['users']:,} users, {s['prompt_tokens_mean']:.0f} tokens on average (max {s['prompt_tokens_max']}), "
              f"{s['users_truncated']:,} shortened to fit")
    if args.command == "prompts":
        _say_where(prompts)
        return 0
    from dpo4rec.generate.stage import run_generate_stage
    from dpo4rec.align.dpo import adapter_chain
    from dpo4rec.run import round_generate_config

    adapters = args.adapter or adapter_chain(args.out, args.round)
    result = run_generate_stage(args.out, args.round, config.model, round_generate_config(config, args.round), adapters=adapters)
    s = result.summary
    print(f"knowledge: {s['texts']:,} texts for {s['users']:,} users ({s['sampled_texts']:,} sampled), "
          f"{s['mean_tokens']:.0f} tokens on average, {s['stopped_at_eos']:.0%} ended at EOS, {s['empty_texts']} empty")
    _say_where(result)
    return 0


def _encode_stage(args: argparse.Namespace) -> int:
    from dpo4rec.encode.stage import run_encode_stage
    from dpo4rec.run_config import record_config

    config = _config(args, {"encode": {k: getattr(args, k) for k in ("encoder", "batch_size", "long_texts")}})
    result = run_encode_stage(args.out, args.round, config.encode)
    record_config(args.out, config)
    s = result.summary
    print(f"{s['user_texts']:,} knowledge texts of {s['users']:,} users and {s['items']:,} items -> {s['dim']}-d vectors ({s['encoder']})")
    long = s["long_texts"]
    print(f"texts longer than {s['max_seq_length']} tokens: {long['user_texts']:,} knowledge, {long['item_texts']:,} item ({long['policy']})")
    _say_where(result)
    return 0


def _recommend_stage(args: argparse.Namespace) -> int:
    """The run's recommender settings, with this command's options as a variant (its own folder): not recorded."""
    from dataclasses import replace

    from dpo4rec.recommend.stage import run_recommend_stage
    from dpo4rec.run_config import record_config

    config = _config(args)
    variant = {k: getattr(args, k) for k in ("backbone", "knowledge", "max_epochs", "seed", "device") if getattr(args, k) is not None}
    result = run_recommend_stage(args.out, args.round, replace(config.recommend, **variant))
    record_config(args.out, config)
    print(format_rerank_table(result.summary))
    _say_where(result)
    return 0


def format_rerank_table(metrics: dict) -> str:
    """Test MAP/NDCG@K of a trained re-ranker (HR/NDCG@K of SASRec) beside the baseline rankings."""
    rows = [(f"{metrics['model']}{'' if metrics['knowledge'] else ' (no knowledge)'}", metrics["test"])]
    rows += [(name, values) for name, values in metrics["baselines"].items()]
    next_item = metrics.get("protocol") == "next_item"
    names = sorted(metrics["test"], key=lambda m: (m.startswith("ndcg"), int(m.split("@")[1]))) if next_item else \
        [k for k in metrics["test"] if k.endswith(("@1", "@3", "@5", "@7"))]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'test targets' if next_item else 'test lists':<{width}}  " + "  ".join(f"{n:>7}" for n in names)]
    lines += [f"{label:<{width}}  " + "  ".join(f"{values[n]:7.4f}" for n in names) for label, values in rows]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from dpo4rec.run import run_pipeline

    report = run_pipeline(_config(args, _data_overrides(args)), args.out)
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
    """reward / align (with its held-out check) / drift / report on a run folder."""
    from dpo4rec.run import train_reward_recommender
    from dpo4rec.run_config import record_config

    config = _config(args, _data_overrides(args) if args.command == "align" else None)
    if args.command == "report":
        from dpo4rec.report import write_report

        print(f"report: {write_report(args.out, config) / 'report.md'}")
        return 0
    if args.command == "drift":
        from dpo4rec.drift.stage import run_drift_stage

        result = run_drift_stage(args.out, args.round, config)
        record_config(args.out, config)
        v = result.summary["validation"]
        if v:
            print(f"validation drift of DPO round {v['round']}: {v['validation_reward_drift']:+.4f} "
                  f"[{v['validation_reward_drift_ci95'][0]:+.4f}, {v['validation_reward_drift_ci95'][1]:+.4f}] over {v['users']} users")
    elif args.command == "reward":
        from dpo4rec.reward.stage import run_reward_stage

        train_reward_recommender(args.out, args.round, config)
        result = run_reward_stage(args.out, args.round, config.recommend, config.align)
        record_config(args.out, config)
        summary = result.summary
        train, spread = summary["train"], summary["train"]["spread"]
        print(f"{summary['reward']} rewards on {summary['reward_lists'].replace('_', '-')} lists of {train['sampled_users']:,} sampled train users: "
              f"best - worst {spread['best_minus_worst_mean']:.4f} on average, {spread['users_with_tied_samples']:,} users tied; "
              f"{train['pairs']:,} pairs ({summary['pairing']}); {summary['validation']['pairs']:,} held-out validation pairs")
    else:
        from dpo4rec.align.dpo import adapter_chain, run_align_stage
        from dpo4rec.runlock import launch_rank, launched

        adapter_chain(args.out, args.round)  # rounds before this one must be aligned
        result = run_align_stage(args.out, args.round, config.model, config.align)
        if launch_rank() > 0:  # rank 0 reports what the launch wrote
            return 0
        history = result.summary
        last = history["steps"][-1] if history["steps"] else {}
        print(f"DPO on {history['pairs']:,} pairs, {len(history['steps'])} steps; last step: loss {last.get('loss', float('nan')):.4f}, "
              f"reward accuracy {last.get('rewards/accuracies', float('nan')):.2f}; reference: {history['reference']}")
        if launched():  # DDP ranks: the held-out check is one process's work (`dpo4rec run` does it after the launch)
            print(f"{'reused' if result.reused else 'wrote'} {result.folder}; the held-out check: "
                  f"'dpo4rec align --out {args.out} --round {args.round}' "
                  "once more without the launcher (it reuses the adapter)")
            return 0
        _say_where(result)
        from dpo4rec.heldout.stage import run_heldout_stage

        result = run_heldout_stage(args.out, args.round, config.model, config.align, config.data.seed)
        record_config(args.out, config)
    _say_where(result)
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
    users = summary["users"]
    selected = f"{users['selected']:,}  (train {users['train']:,} / validation {users['validation']:,} / test {users['test']:,})"
    rows = [("dataset", summary["dataset"]), ("interactions loaded", f"{summary['loaded']['interactions']:,}"),
            ("users loaded", f"{users['loaded']:,}")]
    if "lists" in summary:  # the re-rank protocol
        lists = summary["lists"]
        rows += [
            ("  dropped (< 2 interactions)", f"{users['dropped_fewer_than_2_interactions']:,}"),
            ("  dropped (no complete list)", f"{users['dropped_no_complete_list']:,}"),
            ("users selected", selected),
            ("items", f"{summary['items']:,}"),
            ("lists", f"{lists['total']:,}  (train {lists['train']:,} / validation {lists['validation']:,} / test {lists['test']:,})"),
            ("positives per list", f"{lists['mean_positives_per_list']:.2f}  ({lists['lists_without_positive']:,} lists without one)"),
        ]
    else:  # next_item: one validation and one test target per user
        rows += [
            ("  dropped (< 3 interactions)", f"{users['dropped_fewer_than_3_interactions']:,}"),
            ("users selected", selected),
            ("background users", f"{users['background']:,}  (sequences that only train the recommender)"),
            ("items (all candidates)", f"{summary['items']:,}"),
        ]
    rows.append(("prompt history, mean", f"{summary['prompt_history_mean_length']:.1f} items"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# commands that read a finished stage's output first: they never create a run folder
_NEEDS_RUN_FOLDER = ("encode", "recommend", "reward", "align", "drift", "report")


def main(argv: list[str] | None = None) -> int:
    import warnings

    # TRL 1.16 reads transformers 5's deprecated `is_gradient_checkpointing`: a warning no user can act on
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6", category=FutureWarning)
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
    if args.command in ("reward", "align", "drift", "report"):
        return _round_stage(args)
    return _data_stage(args)


if __name__ == "__main__":
    sys.exit(main())
