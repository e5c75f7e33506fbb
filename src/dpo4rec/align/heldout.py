"""Did DPO learn something that carries to users it never saw? The held-out pair check.

Round t's reward stage also scores N sampled texts of validation users (on
their validation lists, by a recommender that never trained on them) and
pairs them as it pairs the train users (``validation_pairs.parquet``). Those
pairs never reach DPO. After round t's DPO, each pair's implicit reward
margin under the trained policy is

    beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))]

with ``ref`` the round's starting model (base + adapters 0..t-1) and ``pi``
the same plus adapter t: DPO's own reading of which text it now prefers.
Held-out pair accuracy is the share of pairs with a positive margin (a tie,
e.g. after a round without pairs, counts half); chance is 0.5, and the
interval resamples validation users. Writes ``RUN/round_<t>/heldout/``:
``pairs.parquet`` (per pair log-probs and margin), ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dpo4rec.artifacts import StageFolder, existing_output, fingerprint_file, make_manifest, read_json, round_dir, write_json, write_parquet
from dpo4rec.config import AlignConfig, ModelConfig
from dpo4rec.errors import InputError
from dpo4rec.report.bootstrap import paired_bootstrap

STAGE = "heldout"


def run_heldout_stage(run_dir: str | Path, round_index: int, model_cfg: ModelConfig, align: AlignConfig, seed: int = 0):
    """Held-out pair accuracy of round ``round_index``'s DPO; returns (folder, summary, reused)."""
    from dpo4rec.align.dpo import adapter_chain

    run_dir = Path(run_dir)
    here = round_dir(run_dir, round_index)
    pairs_file = here / "preferences" / "validation_pairs.parquet"
    adapter = here / "adapter"
    for path, stage in ((pairs_file, "reward"), (adapter / "adapter_model.safetensors", "align")):
        if not path.is_file():
            raise InputError(f"{path} not found; run the {stage} stage for round {round_index} first")
    chain = adapter_chain(run_dir, round_index)
    inputs = {"validation_pairs.parquet": fingerprint_file(pairs_file), "adapter": fingerprint_file(adapter / "adapter_model.safetensors")}
    inputs.update({f"chain/{p.parent.name}": fingerprint_file(p / "adapter_model.safetensors") for p in chain})
    manifest = make_manifest(STAGE, {"model": {"name": model_cfg.name, "dtype": model_cfg.dtype}, "beta": align.beta}, inputs)
    folder = here / STAGE
    if existing_output(folder, manifest):
        return folder, read_json(folder / "summary.json"), True
    pairs = pd.read_parquet(pairs_file)
    if len(pairs) == 0:
        raise InputError(f"{pairs_file}: no validation pairs (every sampled validation user tied); "
                         "raise generate.sampled_validation_users or use a continuous align.reward")
    scored = score_pairs(pairs, model_cfg, [*chain, adapter], align.beta)
    summary = summarize(scored, seed)
    with StageFolder(folder, manifest) as tmp:
        write_parquet(tmp / "pairs.parquet", scored)
        write_json(tmp / "summary.json", summary)
    return folder, summary, False


def summarize(scored: pd.DataFrame, seed: int = 0) -> dict:
    """Accuracy (ties count half) with a 95% bootstrap interval over users, and the mean margin."""
    correct = np.where(scored["margin"] > 0, 1.0, np.where(scored["margin"] < 0, 0.0, 0.5))
    users = scored["user_index"].to_numpy()
    accuracy, ci = paired_bootstrap(users, correct, np.zeros(len(correct)), seed=seed)
    margin, margin_ci = paired_bootstrap(users, scored["margin"].to_numpy(), np.zeros(len(correct)), seed=seed)
    return {"pairs": len(scored), "users": int(len(np.unique(users))), "heldout_pair_accuracy": accuracy,
            "heldout_pair_accuracy_ci95": list(ci), "margin_mean": margin, "margin_ci95": list(margin_ci),
            "ties": int((scored["margin"] == 0).sum())}


def score_pairs(pairs: pd.DataFrame, model_cfg: ModelConfig, adapters: list[Path], beta: float, batch_size: int = 8) -> pd.DataFrame:
    """Each pair's completion log-probs under the policy (all ``adapters``) and the reference (all but the last)."""
    from dpo4rec.generate.model import attach_adapters, chain_names, load_base_model, load_tokenizer, parse_dtype

    tokenizer = load_tokenizer(model_cfg.name)
    dtype = parse_dtype(model_cfg.dtype, model_cfg.device)
    model = attach_adapters(load_base_model(model_cfg.name, dtype, model_cfg.device), adapters).eval()
    names = chain_names(adapters)
    texts = [(p, c) for p, c in zip(pairs["prompt"], pairs["chosen"])] + [(p, r) for p, r in zip(pairs["prompt"], pairs["rejected"])]
    sequences = [completion_ids(tokenizer, prompt, answer) for prompt, answer in texts]
    logps = {}
    for role, active in (("policy", names), ("reference", names[:-1])):
        if active:
            model.base_model.set_adapter(active, inference_mode=True)
            logps[role] = sequence_logps(model.get_base_model(), sequences, tokenizer.pad_token_id, batch_size, role)
        else:  # round 0: the reference is the base model
            with model.disable_adapter():
                logps[role] = sequence_logps(model.get_base_model(), sequences, tokenizer.pad_token_id, batch_size, role)
    n = len(pairs)
    out = pairs[["user_index", "reward_chosen", "reward_rejected"]].copy()
    out["policy_chosen"], out["policy_rejected"] = logps["policy"][:n], logps["policy"][n:]
    out["reference_chosen"], out["reference_rejected"] = logps["reference"][:n], logps["reference"][n:]
    out["margin"] = beta * ((out["policy_chosen"] - out["reference_chosen"]) - (out["policy_rejected"] - out["reference_rejected"]))
    return out


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
def sequence_logps(model, sequences, pad_id: int, batch_size: int, desc: str = "score") -> np.ndarray:
    """Sum of the answer tokens' log-probs for each (prompt ids, answer ids); the LM head runs on answer positions only."""
    order = sorted(range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1])))
    out = np.zeros(len(sequences))
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc=f"held-out pairs ({desc})", leave=False):
        batch = order[start : start + batch_size]
        rows = [sequences[i][0] + sequences[i][1] for i in batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        hidden = model.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        for j, i in enumerate(batch):
            prompt, answer = sequences[i]
            if not answer:
                continue
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1, device=device)
            logits = model.lm_head(hidden[j, positions]).float()
            out[i] = torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer, device=device)[:, None]).sum().item()
    return out
