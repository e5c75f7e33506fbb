"""Decoder layers below every adapter compute the same thing for the policy and its reference: run them once.

With LoRA on the last K of L decoder layers only (``align.lora_layers``),
the first L - K layers carry no adapter in any round and no gradient, so
the hidden state entering layer L - K is a function of the tokens alone:
the same for the policy and for its reference, and the same at every
optimizer step. ``FrozenLayers`` records it per packed row whenever a pass
runs the whole model (in DPO, TRL's reference pass, which runs once before
training), and a later pass over rows it has seen starts at layer L - K
from the recorded states. DPO's policy steps then run K layers, not L;
the held-out check's reference pass reuses its policy pass's bottom.

The recorded states are exactly what those layers return for that row (a
row is keyed by its tokens and its branch layout, which fix the bottom
layers' input and attention); a row not seen before runs the whole model.
Memory: one hidden vector per token of every recorded row (for 400 pairs
of ~420 tokens, 576-wide in bf16: ~190 MB). The DPO trainer uses it in one
process without activation checkpointing (what the tests cover); under
``align.processes > 1`` or ``gradient_checkpointing`` every pass runs every
layer.
"""

from __future__ import annotations

import contextlib
import re

import torch

_LAYER = re.compile(r"\blayers\.(\d+)\.")


def unwrapped(model):
    """The Hugging Face model inside a DistributedDataParallel (``align.processes > 1``) and/or PEFT wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model):
    """The decoder (the module holding ``layers``) of a causal LM, PEFT- or DDP-wrapped or not, or the decoder itself."""
    model = unwrapped(model)
    return model if hasattr(model, "layers") else model.get_decoder()


def first_adapted_layer(model) -> int:
    """The lowest decoder layer holding a LoRA module of any adapter; 0 when none is found (nothing to reuse)."""
    found = [int(m.group(1)) for name, _ in model.named_modules() if "lora_A" in name and (m := _LAYER.search(name))]
    return min(found) if found else 0


class FrozenLayers:
    """Hidden states entering decoder layer ``start`` per packed row, recorded by full passes, reused by later ones.

    ``start``: the first layer any adapter of ``model`` touches (0 switches reuse off)."""

    def __init__(self, model, enabled: bool = True):
        self.start = first_adapted_layer(model) if enabled else 0
        self.states: dict[tuple, torch.Tensor] = {}
        self.rows_reused = 0  # rows that started at layer ``start``

    def row_keys(self, input_ids: torch.Tensor, layout: list[tuple]) -> list[tuple]:
        """One key per packed row: its real tokens and its branch lengths (``pack_answers``'s ``pair_layout``)."""
        if not self.start:
            return []
        return [(tuple(row[: sum(lengths)].tolist()), tuple(lengths)) for row, lengths in zip(input_ids, layout)]

    def __call__(self, model, keys: list[tuple], inputs: dict):
        """``model(**inputs)`` (``inputs`` holds ``input_ids``), from layer ``start`` when every row was recorded."""
        if not self.start:
            return model(**inputs)
        if all(key in self.states for key in keys):
            ids = inputs["input_ids"]
            first = self.states[keys[0]]
            embeds = first.new_zeros((*ids.shape, first.shape[-1]))  # padding: zeros (no label, attends to nothing)
            for row, key in enumerate(keys):
                embeds[row, : len(key[0])] = self.states[key]
            inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
            self.rows_reused += len(keys)
            with self._from_start(decoder_of(model)):
                return model(inputs_embeds=embeds, **inputs)
        with self._recording(decoder_of(model), keys):
            return model(**inputs)

    def summary(self) -> dict:
        """For the trainer's log: from which layer the policy's rows ran (0: every layer), rows recorded and reused."""
        return {"policy_rows_from_layer": self.start, "rows_recorded": len(self.states), "policy_rows_reused": self.rows_reused}

    def clear(self) -> None:
        self.states.clear()

    @contextlib.contextmanager
    def _recording(self, decoder, keys):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            for row, key in enumerate(keys):
                self.states.setdefault(key, hidden[row, : len(key[0])].detach().clone())

        handle = decoder.layers[self.start].register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _from_start(self, decoder):
        layers = decoder.layers
        decoder.layers = torch.nn.ModuleList(list(layers)[self.start:])  # the same modules: their weights, adapters, grads
        try:
            yield
        finally:
            decoder.layers = layers
