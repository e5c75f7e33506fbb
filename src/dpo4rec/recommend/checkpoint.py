"""Save and load a trained re-ranker: ``model.safetensors`` + ``model.json`` (its spec)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from dpo4rec.artifacts import read_json, read_safetensors, write_bytes_atomic, write_json
from dpo4rec.errors import InputError
from dpo4rec.recommend.models import ModelSpec, Reranker, build_model

WEIGHTS, SPEC = "model.safetensors", "model.json"


def save_recommender(model: Reranker, folder: Path) -> None:
    """Write the weights (buffers included: item attributes and item vectors) and the spec."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(Path(folder) / WEIGHTS, save(state, metadata={"backbone": model.spec.backbone}))
    write_json(Path(folder) / SPEC, model.spec.to_dict())


def load_recommender(folder: str | Path, device: str = "cpu") -> Reranker:
    """Rebuild a model that ``save_recommender`` wrote, in eval mode."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / SPEC).is_file():
        raise InputError(f"{folder}: no trained recommender ({WEIGHTS}, {SPEC}); run the recommend stage first")
    spec = ModelSpec(**read_json(folder / SPEC))
    model = build_model(spec)
    state = read_safetensors(folder / WEIGHTS)
    for name in ("item_attrs", "item_knowledge"):  # shapes come from the data; size the buffers first
        if name in state:
            setattr(model, name, torch.zeros_like(state[name]))
    model.load_state_dict(state)
    return model.to(device).eval()
