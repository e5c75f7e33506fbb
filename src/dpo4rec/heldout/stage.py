"""Did DPO learn something that carries to users it never saw? The held-out pair check.

Round t's reward stage also scores N sampled texts of validation users (on
their validation lists, by a recommender that never trained on them) and
keeps every two samples of a user whose rewards differ as a pair
(``validation_pairs.parquet``). Those never reach DPO. After round t's DPO,
each sampled validation text gets its log-ratio under the trained policy
``pi`` (round t's model + adapter t) against the reference ``ref`` (round
t's model), and each pair its implicit reward margin

    beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)]

DPO's own reading of which text it now prefers. Held-out pair accuracy is
the share of pairs with a positive margin (a tie, e.g. after a round without
pairs, counts half); chance is 0.5, and the interval resamples validation
users (all of a user's pairs together). Reported over every pair (the
headline: each text is scored once, so all 45 pairs of 10 samples cost what
one does) and over each user's best-vs-worst pair alone.

Two readings guard the headline against what DPO does to every text. DPO
often sharpens the policy (the log-ratio follows the starting model's own
log-prob) and moves it by length (a log-ratio per token summed over the
answer): both order a user's texts whatever the reward said, and score well
when the reward happens to prefer likely or short texts. So a real run also
reports how often the starting model's log-prob alone orders the pairs the
reward's way (``reference_pair_accuracy``, no DPO at all), and the accuracy
of the margin net of those two (``net_pair_accuracy``: the log-ratio minus
its least-squares fit, within users, on the reference log-prob and the
answer's tokens): what DPO learned beyond sharpening and length.

Writes ``RUN/round_<t>/heldout/``: ``texts.parquet`` (per text log-probs),
``pairs.parquet`` (per pair margin), ``summary.json``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dpo4rec.artifacts import StageFolder, StageResult, begin_stage, fingerprint_file, read_parquet, round_dir, write_json, write_parquet
from dpo4rec.best_worst import best_and_worst
from dpo4rec.config import AlignConfig, ModelConfig
from dpo4rec.errors import InputError
from dpo4rec.stats import paired_bootstrap

log = logging.getLogger(__name__)
STAGE = "heldout"


def run_heldout_stage(run_dir: str | Path, round_index: int, model_cfg: ModelConfig, align: AlignConfig, seed: int = 0) -> StageResult:
    """Held-out pair accuracy of round ``round_index``'s DPO."""
    from dpo4rec.align.dpo import adapter_chain

    run_dir = Path(run_dir)
    here = round_dir(run_dir, round_index)
    pairs_file = here / "reward" / "validation_pairs.parquet"
    adapter = here / "align"
    for path, stage in ((pairs_file, "reward"), (adapter / "adapter_model.safetensors", "align")):
        if not path.is_file():
            raise InputError(f"{path} not found; run the {stage} stage for round {round_index} first")
    prompts_file = run_dir / "prompts" / "prompts.parquet"
    chain = adapter_chain(run_dir, round_index)
    inputs = {"validation_pairs.parquet": fingerprint_file(pairs_file), "adapter": fingerprint_file(adapter / "adapter_model.safetensors"),
              "prompts.parquet": fingerprint_file(prompts_file)}
    inputs.update({f"chain/{p.parent.name}": fingerprint_file(p / "adapter_model.safetensors") for p in chain})
    folder = here / STAGE
    manifest, done = begin_stage(folder, STAGE, {"model": {"name": model_cfg.name, "dtype": model_cfg.dtype}, "beta": align.beta,
                                                 "arithmetic": "fp32"}, inputs)
    if done:
        return done
    pairs = read_parquet(pairs_file)
    if len(pairs) == 0:  # every sampled validation user's samples tied: nothing to check, and the report says so
        log.warning("%s: no validation pairs; raise generate.sampled_validation_users or use a continuous align.reward", pairs_file)
        summary = {"pairs": 0, "users": 0, "heldout_pair_accuracy": None, "heldout_pair_accuracy_ci95": None,
                   "skipped": "no validation pairs: every sampled validation user's samples tied"}
        with StageFolder(folder, manifest) as tmp:
            write_json(tmp / "summary.json", summary)
        return StageResult(folder, summary, False)
    texts = pair_texts(pairs)
    prompts = read_parquet(prompts_file).set_index("user_index")["message"]
    texts = score_texts(texts, prompts, model_cfg, [*chain, adapter])
    scored = pair_margins(pairs, texts, align.beta)
    summary = summarize(scored, seed)
    with StageFolder(folder, manifest) as tmp:
        write_parquet(tmp / "texts.parquet", texts)
        write_parquet(tmp / "pairs.parquet", scored)
        write_json(tmp / "summary.json", summary)
    return StageResult(folder, summary, False)


def pair_texts(pairs: pd.DataFrame) -> pd.DataFrame:
    """The distinct texts of ``pairs`` (user_index, sample, text), each once: a text sits in many pairs."""
    return pd.concat([
        pairs[["user_index", "sample_chosen", "chosen"]].set_axis(["user_index", "sample", "text"], axis=1),
        pairs[["user_index", "sample_rejected", "rejected"]].set_axis(["user_index", "sample", "text"], axis=1),
    ]).drop_duplicates(["user_index", "sample"]).sort_values(["user_index", "sample"]).reset_index(drop=True)


def pair_margins(pairs: pd.DataFrame, texts: pd.DataFrame, beta: float) -> pd.DataFrame:
    """Each pair's implicit reward margin from its two texts' log-ratios; ``best_worst`` marks each user's widest pair."""
    indexed = texts.set_index(["user_index", "sample"])
    out = pairs[["user_index", "sample_chosen", "sample_rejected", "reward_chosen", "reward_rejected"]].copy()
    out["margin"] = beta * _chosen_minus_rejected(indexed["policy"] - indexed["reference"], out)
    if "n_answer_tokens" in texts:  # a real run's texts: also the margins that say how much is sharpening or length
        out["reference_margin"] = _chosen_minus_rejected(indexed["reference"], out)
        out["net_margin"] = beta * _chosen_minus_rejected(net_log_ratio(texts), out)
    rewards = pd.concat([  # each text of the pairs once, with its reward: best and worst by the one rule (best_worst.py)
        out[["user_index", "sample_chosen", "reward_chosen"]].set_axis(["user_index", "sample", "reward"], axis=1),
        out[["user_index", "sample_rejected", "reward_rejected"]].set_axis(["user_index", "sample", "reward"], axis=1),
    ]).drop_duplicates(["user_index", "sample"])
    ends = best_and_worst(rewards).reindex(out["user_index"])
    out["best_worst"] = (out["sample_chosen"].to_numpy() == ends["best"].to_numpy()) & (out["sample_rejected"].to_numpy() == ends["worst"].to_numpy())
    return out


def _chosen_minus_rejected(values: pd.Series, pairs: pd.DataFrame) -> np.ndarray:
    """Per pair: ``values`` (indexed by user_index, sample) at the chosen sample minus at the rejected one."""
    def at(column):
        return values.reindex(pd.MultiIndex.from_arrays([pairs["user_index"], pairs[column]])).to_numpy()
    return at("sample_chosen") - at("sample_rejected")


def net_log_ratio(texts: pd.DataFrame) -> pd.Series:
    """Each text's log-ratio minus its least-squares fit on the reference log-prob and the answer's tokens,
    all centred within users (only the order of a user's own texts counts), indexed by (user_index, sample)."""
    def centred(column):
        return (texts[column] - texts.groupby("user_index")[column].transform("mean")).to_numpy(dtype=float)
    ratio = centred("policy") - centred("reference")
    features = np.column_stack([centred("reference"), centred("n_answer_tokens")])
    slope = np.linalg.lstsq(features, ratio, rcond=None)[0]
    return pd.Series(ratio - features @ slope, index=pd.MultiIndex.from_frame(texts[["user_index", "sample"]]))


def pair_correct(scored: pd.DataFrame, column: str = "margin") -> np.ndarray:
    """Per pair: 1 where the margin prefers the chosen text, 0 where the rejected, 0.5 on a tie."""
    return np.where(scored[column] > 0, 1.0, np.where(scored[column] < 0, 0.0, 0.5))


def accuracy_ci(users: np.ndarray, correct: np.ndarray, seed: int = 0) -> tuple[float, list[float]]:
    """Mean correctness over pairs and its 95% bootstrap interval over users (all of a user's pairs together)."""
    accuracy, ci = paired_bootstrap(users, correct, np.zeros(len(correct)), seed=seed)
    return accuracy, list(ci)


def _accuracy(scored: pd.DataFrame, seed: int, column: str = "margin") -> tuple[float, list[float]]:
    return accuracy_ci(scored["user_index"].to_numpy(), pair_correct(scored, column), seed)


def summarize(scored: pd.DataFrame, seed: int = 0) -> dict:
    """Accuracy (ties count half) with a 95% bootstrap interval over users, over all pairs and best-vs-worst alone."""
    users = scored["user_index"].to_numpy()
    accuracy, ci = _accuracy(scored, seed)
    margin, margin_ci = paired_bootstrap(users, scored["margin"].to_numpy(), np.zeros(len(scored)), seed=seed)
    summary = {"pairs": len(scored), "users": int(len(np.unique(users))), "heldout_pair_accuracy": accuracy,
               "heldout_pair_accuracy_ci95": ci, "margin_mean": margin, "margin_ci95": list(margin_ci),
               "ties": int((scored["margin"] == 0).sum())}
    if "best_worst" in scored:
        best_worst, best_worst_ci = _accuracy(scored[scored["best_worst"]], seed)
        summary.update({"best_worst_accuracy": best_worst, "best_worst_accuracy_ci95": best_worst_ci})
    for column, key in (("reference_margin", "reference_pair_accuracy"), ("net_margin", "net_pair_accuracy")):
        if column in scored:
            value, value_ci = _accuracy(scored, seed, column)
            summary.update({key: value, f"{key}_ci95": value_ci})
    return summary


def score_texts(texts: pd.DataFrame, prompts: pd.Series, model_cfg: ModelConfig, adapters: list[Path]) -> pd.DataFrame:
    """Each text's answer log-prob under the policy (all ``adapters``) and the reference (all but the last).

    A user's texts are one packed row (the prompt once, each answer a branch), scored by the policy and then
    by the reference; with adapters on the top layers only, the reference starts from the policy pass's
    hidden states below them (``FrozenLayers``: the same numbers, fewer layers)."""
    from dpo4rec.align.frozen_layers import FrozenLayers
    from dpo4rec.align.shared_prompt import use_pair_attention
    from dpo4rec.llm import attach_adapters, chain_names, load_base_model, load_tokenizer, model_device, parse_dtype

    tokenizer = load_tokenizer(model_cfg.name)
    device = model_device(model_cfg)
    dtype = parse_dtype(model_cfg.dtype, device)
    # the weights as trained (bf16 base, adapters), in fp32 arithmetic: the margins are small differences of
    # large log-probs, and bf16 rounding noise in the activations would blur them (see test_exact_policy)
    model = attach_adapters(load_base_model(model_cfg.name, dtype, device), adapters).float().eval()
    use_pair_attention(model)
    frozen = FrozenLayers(model)
    names = chain_names(adapters)
    policy, reference, lengths = [], [], []
    for user, frame in tqdm(texts.groupby("user_index", sort=True), desc="held-out texts (policy, reference)", leave=False):
        answers = [completion_ids(tokenizer, prompts[user], text) for text in frame["text"]]
        prompt, answers = answers[0][0], [a for _, a in answers]
        for active, values in ((names, policy), (names[:-1], reference)):
            if active:
                model.base_model.set_adapter(active, inference_mode=True)
            # round 0's reference is the base model: every adapter off
            with model.disable_adapter() if not active else contextlib.nullcontext():
                values.extend(answer_logps(model.get_base_model(), prompt, answers, frozen))
        frozen.clear()  # one user's states at a time
        lengths.extend(len(a) for a in answers)
    out = texts.sort_values(["user_index"], kind="stable").copy()
    out["policy"], out["reference"], out["n_answer_tokens"] = policy, reference, lengths
    return out.loc[texts.index]


def completion_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) under the chat template, as the sampler and DPO see them."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False)
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise InputError("the chat template renders the prompt differently with an answer; cannot score completions")
    return prompt_ids, full_ids[len(prompt_ids):]


@torch.inference_mode()
def answer_logps(model, prompt: list[int], answers: list[list[int]], frozen=None) -> np.ndarray:
    """Sum of each answer's token log-probs after one shared ``prompt``, all in one packed row (``pack_answers``:
    the prompt once, each answer a branch that sees it). ``model``: a causal LM (``use_pair_attention`` makes its
    attention run by segments on a CPU; otherwise the block mask); ``frozen``: a ``FrozenLayers`` that records
    (or reuses) the hidden states below the adapters."""
    from dpo4rec.align.frozen_layers import FrozenLayers
    from dpo4rec.align.shared_prompt import pack_answers

    device = next(model.parameters()).device
    packed = pack_answers([(torch.tensor(prompt, device=device), [torch.tensor(a, dtype=torch.long, device=device) for a in answers])], pad_id=0)
    labels = packed["shift_labels"][0]
    frozen = frozen or FrozenLayers(model, enabled=False)
    inputs = {"input_ids": packed["input_ids"], "attention_mask": packed["attention_mask"],
              "position_ids": packed["position_ids"], "pair_layout": packed["pair_layout"], "use_cache": False}
    hidden = frozen(model.get_decoder(), frozen.row_keys(packed["input_ids"], packed["pair_layout"]), inputs).last_hidden_state[0]
    scored = labels != -100  # each answer's tokens, answer after answer (a branch's last position predicts nothing)
    logits = model.lm_head(hidden[scored]).float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels[scored][:, None])[:, 0]
    return np.array([part.sum().item() for part in torch.split(token_logps, [len(a) for a in answers])])
