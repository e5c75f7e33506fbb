"""The prompts stage: one chat prompt per user from the prompt history only.

Reads ``RUN/data/`` and writes ``RUN/prompts/prompts.parquet`` (user_index,
message: the user turn, text: the chat-formatted prompt, n_tokens,
n_history: items shown, n_dropped: oldest items cut to fit
``max_prompt_tokens``) and, when asked, ``item_prompts.parquet``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.artifacts import (
    StageFolder, StageResult, begin_stage, manifest_fingerprint, read_json, read_parquet, write_json, write_parquet,
)
from dpo4rec.config import ModelConfig, PromptConfig, to_dict
from dpo4rec.data.stage import used_items
from dpo4rec.errors import InputError
from dpo4rec.prompts.templates import ITEM_TEMPLATES, USER_TEMPLATES, check_template, clean_text, domain_of

log = logging.getLogger(__name__)
STAGE = "prompts"


def describe_item(row, domain: str, genres: bool = False) -> str:
    """One history line for an item: quoted title plus its attributes (``genres``: and its genres)."""
    title = clean_text(row.get("title"))
    if genres:
        value = row.get("genres")
        names = [g for g in map(clean_text, str(value).split("|") if pd.notna(value) else []) if g]  # an item may have none
        return f'"{title}"' + (f" ({', '.join(names)})" if names else "")
    if domain == "movies":  # KAR's form, '"Title (Year)", N stars': genres cost ~a third more tokens (prompts.history_genres)
        return f'"{title}"'
    if domain == "beauty":
        parts = [clean_text(row.get("brand")) if pd.notna(row.get("brand")) else "", clean_text(row.get("categories", ""))]
        extra = "; ".join(p for p in parts if p)
        return f'"{title}"' + (f" ({extra})" if extra else "")
    return f'"{title}"'


def describe_profile(user: dict, domain: str) -> str:
    """A sentence from side information (ML-1M: gender, age group, occupation)."""
    if "gender" not in user or pd.isna(user.get("gender")):
        return ""
    gender = {"F": "female", "M": "male"}.get(str(user["gender"]), clean_text(user["gender"]))
    age = user.get("age_group", user.get("age"))
    age_text = f" aged {clean_text(age)}" if age is not None and not pd.isna(age) else ""
    occupation = user.get("occupation")
    job = f", working as {clean_text(occupation)}" if occupation is not None and not pd.isna(occupation) else ""
    return f"The user is {gender}{age_text}{job}.\n"


def history_lines(history: pd.DataFrame, item_text: dict[int, str], with_ratings: bool) -> list[str]:
    lines = []
    for item, rating in zip(history["item_index"].to_numpy(), history["rating"].to_numpy()):
        line = item_text[int(item)]
        if with_ratings and not np.isnan(rating):
            line += f", {rating:g} stars"
        lines.append(line)
    return lines


def build_user_prompts(data_dir: Path, prompts: PromptConfig, tokenizer, dataset: str) -> tuple[pd.DataFrame, dict]:
    """Render, tokenize and (if needed) shorten one prompt per user."""
    domain = domain_of(dataset)
    template = check_template(prompts.user_template or USER_TEMPLATES[domain], "user", "prompts.user_template")
    users = read_parquet(data_dir / "users.parquet")
    items = read_parquet(data_dir / "items.parquet")
    inter = read_parquet(data_dir / "interactions.parquet")
    if prompts.history_genres and "genres" not in items.columns:
        raise InputError(f"prompts.history_genres: {data_dir / 'items.parquet'} has no genres column")
    item_text = {int(r["item_index"]): describe_item(r, domain, prompts.history_genres) for r in items.to_dict("records")}
    long_items = {i for i, text in item_text.items() if len(text) > prompts.max_item_chars}
    for i in long_items:  # cut, not refused: one huge title must not make every prompt holding it too long
        item_text[i] = shorten(item_text[i], prompts.max_item_chars)
    # stars help on MovieLens and on own data with ratings; Amazon's 5-core set has none
    with_ratings = domain == "movies" or (domain == "generic" and bool(inter["rating"].notna().any()))
    histories = inter[inter["in_prompt"]].groupby("user_index", sort=True)


    rows = []
    for user in users.to_dict("records"):
        history = histories.get_group(user["user_index"])
        lines = history_lines(history, item_text, with_ratings)
        profile = describe_profile(user, domain)
        dropped = 0
        while True:
            message = template.format(profile=profile, history="\n".join(lines))
            text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
            n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n_tokens <= prompts.max_prompt_tokens or len(lines) <= 1:
                break
            # cut the oldest items, several at a time when far over the limit
            cut = max(1, min(len(lines) - 1, (n_tokens - prompts.max_prompt_tokens) // 12))
            lines, dropped = lines[cut:], dropped + cut
        if n_tokens > prompts.max_prompt_tokens:
            raise InputError(
                f"prompts.max_prompt_tokens={prompts.max_prompt_tokens} is too small: user {user['user_id']}'s "
                f"prompt needs {n_tokens} tokens with a single history item"
            )
        rows.append({"user_index": user["user_index"], "message": message, "text": text, "n_tokens": n_tokens,
                     "n_history": len(lines), "n_dropped": dropped})
    frame = pd.DataFrame(rows)
    summary = {
        "users": len(frame),
        "template_domain": domain,
        "prompt_tokens_mean": float(frame["n_tokens"].mean()),
        "prompt_tokens_max": int(frame["n_tokens"].max()),
        "users_truncated": int((frame["n_dropped"] > 0).sum()),
        "history_items_dropped": int(frame["n_dropped"].sum()),
        "item_texts_cut": len(long_items),
    }
    if long_items:
        log.warning("%d item descriptions longer than prompts.max_item_chars = %d were cut", len(long_items), prompts.max_item_chars)
    if summary["users_truncated"]:
        log.warning("%d prompts lost their oldest history items to fit %d tokens", summary["users_truncated"], prompts.max_prompt_tokens)
    return frame, summary


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def build_item_prompts(data_dir: Path, prompts: PromptConfig, tokenizer, dataset: str) -> pd.DataFrame:
    """One factual-knowledge prompt per item that the run's lists and histories hold (KAR's item prompt)."""
    domain = domain_of(dataset)
    template = check_template(prompts.item_template or ITEM_TEMPLATES[domain], "item", "prompts.item_template")
    items = read_parquet(data_dir / "items.parquet")
    items = items[items["item_index"].isin(used_items(data_dir))]
    messages = [template.format(title=f'"{shorten(clean_text(t), prompts.max_item_chars)}"') for t in items["title"]]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True) for m in messages]
    return pd.DataFrame({"item_index": items["item_index"], "message": messages, "text": texts})


def run_prompt_stage(run_dir: str | Path, prompts: PromptConfig, model: ModelConfig) -> StageResult:
    """Write ``RUN/prompts/`` from ``RUN/data/``, or reuse it if inputs and config match."""
    from dpo4rec.llm import load_tokenizer

    run_dir = Path(run_dir)
    data_dir = run_dir / "data"
    if not (data_dir / "manifest.json").is_file():
        raise InputError(f"{data_dir}: no data stage output; run `dpo4rec data --out {run_dir}` first")
    data_manifest = read_json(data_dir / "manifest.json")
    folder = run_dir / STAGE
    manifest, done = begin_stage(folder, STAGE, {"prompts": to_dict(prompts), "model": model.name},
                                 {"data/manifest.json": manifest_fingerprint(data_dir / "manifest.json")})
    if done:
        return done
    tokenizer = load_tokenizer(model.name)
    dataset = data_manifest["config"]["dataset"]
    frame, summary = build_user_prompts(data_dir, prompts, tokenizer, dataset)
    with StageFolder(folder, manifest) as tmp:
        write_parquet(tmp / "prompts.parquet", frame)
        if prompts.item_prompts:
            write_parquet(tmp / "item_prompts.parquet", build_item_prompts(data_dir, prompts, tokenizer, dataset))
        write_json(tmp / "summary.json", summary)
    return StageResult(folder, summary, reused=False)
