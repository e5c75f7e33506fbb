"""Two finished runs side by side: which config did better, with intervals.

Both runs must share their test lists (same data config), so the comparison
is paired over test users, as inside one report. Validation MAP@5 (NDCG@10
under the next-item protocol: what a user should choose a config by) is
printed beside the test numbers; test users decide nothing.

    dpo4rec compare runs/a runs/b
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpo4rec.artifacts import fingerprint_file, first_difference, read_json, read_parquet
from dpo4rec.errors import InputError
from dpo4rec.stats import paired_bootstrap
from dpo4rec.report.report import arm_folders
from dpo4rec.report.verdicts import metric_names
from dpo4rec.run_config import load_run_config


def _arms(run: Path) -> dict[str, Path]:
    if not (run / "report" / "metrics.json").is_file():
        raise InputError(f"{run / 'report' / 'metrics.json'} not found: finish the run first ('dpo4rec run --out {run}')")
    return {arm: folder for arm, folder in arm_folders(run, load_run_config(run)).items() if (folder / "test_lists.parquet").is_file()}


def check_same_data(runs: dict[str, Path]) -> None:
    """Paired intervals need the same users and lists on both sides: the data stage's outputs must be byte-identical."""
    for name in ("users.parquet", "lists.parquet", "interactions.parquet"):
        paths = {side: run / "data" / name for side, run in runs.items()}
        for path in paths.values():
            if not path.is_file():
                raise InputError(f"{path}: not found; compare needs two finished runs")
        if fingerprint_file(paths["a"]) != fingerprint_file(paths["b"]):
            configs = {side: read_json(run / "config.json").get("data") for side, run in runs.items()}
            why = first_difference(configs["a"], configs["b"], "data") if configs["a"] != configs["b"] else "same data config, different data files"
            raise InputError(f"{runs['a']} and {runs['b']} were made from different data (data/{name} differs; {why}): "
                             "their test users cannot be paired")


def compare_runs(run_a: str | Path, run_b: str | Path, metrics: tuple[str, ...] | None = None, seed: int = 0) -> dict:
    """Per arm present in both runs, and for each run's selected arm: the validation metric rounds are selected by,
    test means, A - B with 95% CI (``metrics``: default the protocol's two headline metrics, MAP@5 and NDCG@5 or
    HR@10 and NDCG@10)."""
    runs = {"a": Path(run_a), "b": Path(run_b)}
    check_same_data(runs)
    folders = {side: _arms(run) for side, run in runs.items()}
    names = metric_names(read_json(runs["a"] / "report" / "metrics.json"))
    metrics, select = tuple(metrics or names["headline"]), names["select"]
    selected = {side: read_json(run / "report" / "metrics.json")["selected_round"] for side, run in runs.items()}
    pick = {side: "base_llm" if selected[side] == 0 else f"dpo_round_{selected[side]}" for side in runs}
    rows = [(arm, arm, arm) for arm in folders["a"] if arm in folders["b"]]
    rows.append(("selected", pick["a"], pick["b"]))
    table = []
    for label, arm_a, arm_b in rows:
        lists = {side: read_parquet(folders[side][arm] / "test_lists.parquet") for side, arm in (("a", arm_a), ("b", arm_b))}
        if not np.array_equal(lists["a"]["user_index"].to_numpy(), lists["b"]["user_index"].to_numpy()):
            raise InputError(f"{runs['a']} and {runs['b']} have different test lists: compare runs made from the same data config")
        entry = {"arm": label, "arm_a": arm_a, "arm_b": arm_b,
                 "validation": {side: read_json(folders[side][arm] / "metrics.json")["validation"][select]
                                for side, arm in (("a", arm_a), ("b", arm_b))}}
        for metric in metrics:
            diff, ci = paired_bootstrap(lists["a"]["user_index"].to_numpy(), lists["a"][metric].to_numpy(), lists["b"][metric].to_numpy(), seed=seed)
            entry[metric] = {"a": float(lists["a"][metric].mean()), "b": float(lists["b"][metric].mean()), "diff": diff, "ci95": list(ci)}
        table.append(entry)
    return {"a": str(runs["a"]), "b": str(runs["b"]), "selected": pick, "test_users": int(lists["a"]["user_index"].nunique()),
            "metrics": list(metrics), "validation_metric": select, "arms": table}


def format_comparison(result: dict) -> str:
    """A markdown table of ``compare_runs``' result."""
    metrics, select = result["metrics"], result["validation_metric"].upper()
    lines = [f"A = {result['a']}, B = {result['b']}; {result['test_users']} test users; "
             f"selected by validation {select}: A {result['selected']['a']}, B {result['selected']['b']}", "",
             f"| arm | validation {select} A / B | " + " | ".join(f"test {m} A / B | A - B [95% CI]" for m in metrics) + " |",
             "|---|---|" + "---|---|" * len(metrics)]
    for row in result["arms"]:
        label = row["arm"] if row["arm_a"] == row["arm_b"] else f"{row['arm']} ({row['arm_a']} / {row['arm_b']})"
        cells = [f"{row['validation']['a']:.4f} / {row['validation']['b']:.4f}"]
        for m in metrics:
            v = row[m]
            cells += [f"{v['a']:.4f} / {v['b']:.4f}", f"{v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
