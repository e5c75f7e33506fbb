"""The report's figures, from metrics.json: differences around zero, the held-out checks around chance, DPO's loss.

Differences are drawn with their intervals around a zero line (not bars on a cut axis, where 0.003 looks large).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dpo4rec.report.markdown import metric_names
from dpo4rec.report.verdicts import arm_name


def draw(out: Path, metrics: dict) -> None:
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" is nothing a user can act on
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _differences(plt, out, metrics)
    _alignment(plt, out, metrics)
    _dpo(plt, out, metrics)


def _differences(plt, out: Path, metrics: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.6 + 0.45 * max(3, len(metrics["comparisons"]) // 8)), sharey=True)
    for ax, metric in zip(axes, metric_names(metrics)["headline"]):
        rows = [c for c in metrics["comparisons"] if c["metric"] == metric]
        y = np.arange(len(rows))[::-1]
        diffs = np.array([c["diff"] for c in rows])
        err = np.array([[c["diff"] - c["ci95"][0], c["ci95"][1] - c["diff"]] for c in rows]).T
        colors = ["#55A868" if c["ci95"][0] > 0 else "#C44E52" if c["ci95"][1] < 0 else "#4C72B0" for c in rows]
        for yi, d, lo, hi, color in zip(y, diffs, err[0], err[1], colors):
            ax.errorbar(d, yi, xerr=[[lo], [hi]], fmt="o", capsize=4, color=color)
        ax.axvline(0, color="grey", lw=1, ls="--")
        ax.locator_params(axis="x", nbins=5)
        ax.set_yticks(y, [f"{arm_name(c['a'])} - {arm_name(c['b'])}" for c in rows], fontsize=8)
        ax.set_title(f"test {metric.upper()}: difference, 95% CI (green/red: clear of 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "differences.png", dpi=110)
    plt.close(fig)


def _alignment(plt, out: Path, metrics: dict) -> None:
    checked = [a for a in metrics.get("alignment", []) if a["heldout_pair_accuracy"] is not None]
    if not checked:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, key, chance, title in ((axes[0], "heldout_pair_accuracy", 0.5, "held-out pair accuracy (chance 0.5)"),
                                   (axes[1], "validation_reward_drift", 0.0, "validation drift (chance 0)")):
        shown = [a for a in checked if a.get(key) is not None]
        x = [a["round"] + 1 for a in shown]
        y = [a[key] for a in shown]
        err = np.array([[a[key] - a[f"{key}_ci95"][0], a[f"{key}_ci95"][1] - a[key]] for a in shown]).T.reshape(2, -1)
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=5, color="#C44E52", label="after DPO")
        if key == "heldout_pair_accuracy":
            before = [(a["round"] + 1, a["heldout_reference_accuracy"]) for a in shown if a.get("heldout_reference_accuracy") is not None]
            if before:
                ax.plot(*zip(*before), "x", color="grey", label="starting model alone")
                ax.legend(fontsize=7)
        ax.axhline(chance, color="grey", lw=1, ls="--")
        ax.set_xticks(x)
        ax.set_xlim(min(x) - 0.5, max(x) + 0.5)
        ax.set_xlabel("DPO round")
        ax.set_title(title + ", 95% CI over validation users", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "alignment.png", dpi=110)
    plt.close(fig)


def _dpo(plt, out: Path, metrics: dict) -> None:
    trained = [r for r in metrics["rounds"] if r.get("dpo", {}).get("steps")]
    if not trained:
        return
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for r in trained:
        steps = r["dpo"]["steps"]
        x = [s["step"] for s in steps]
        loss = np.array([s["loss"] for s in steps], float)
        window = max(1, len(loss) // 10)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(x, loss, color="#4C72B0", alpha=0.25, lw=0.8)
        label = f"DPO round {r['round'] + 1}" + (f" (mean of {window} steps)" if window > 1 else "")
        ax.plot(x[window - 1:], smooth, lw=1.8, label=label)
    ax.axhline(math.log(2), color="grey", lw=1, ls="--", label="ln 2: no preference learned yet")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DPO loss (training pairs)")
    ax.set_title("DPO loss: below ln 2 = the policy prefers the chosen texts of its training pairs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rewards_and_dpo.png", dpi=110)
    plt.close(fig)
