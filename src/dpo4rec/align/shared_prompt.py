"""DPO with each pair's prompt evaluated once: TRL's trainer and loss, one forward per pair.

TRL's DPOTrainer puts ``prompt + chosen`` and ``prompt + rejected`` in two
rows, so the ~530-token prompt runs twice for a ~60-token answer. Here the
two rows of a pair become one packed row,

    prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected

where each branch sees the shared part and itself (a block attention mask)
and restarts its positions where the prompt ends. The prompt's last token
appears once per branch because it predicts each answer's first token, and
one position can carry only one label. The backbone runs on the packed rows,
TRL's own fused LM head scores the labelled positions (``shift_labels``),
and the per-token outputs are put back into TRL's two-row layout, so TRL's
loss, reference log-probs and metrics run unchanged on them.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

PAD_BRANCH, SHARED, CHOSEN, REJECTED = -1, 0, 1, 2
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int) -> dict:
    """TRL's ``[chosen rows; rejected rows]`` batch as one packed row per pair.

    Returns the model inputs (``input_ids``, a boolean 4D ``attention_mask``,
    ``position_ids``, ``shift_labels``) and ``source``: for each labelled
    position of TRL's shifted layout, in row-major order, the flat index in
    the packed rows that holds its log-prob.
    """
    pairs = input_ids.size(0) // 2
    rows, branches, positions, targets, source = [], [], [], [], [[], []]  # source: per pair, chosen and rejected
    for i in range(pairs):
        (prompt, chosen), (other_prompt, rejected) = (_split(input_ids[r], attention_mask[r], labels[r]) for r in (i, pairs + i))
        if not torch.equal(prompt, other_prompt):
            raise ValueError(f"pair {i}: the chosen and rejected rows do not share their prompt")
        shared = prompt.numel() - 1
        parts, tags, pos, tgt = [prompt[:-1]], [SHARED] * shared, list(range(shared)), [-100] * shared
        for answer, tag in ((chosen, CHOSEN), (rejected, REJECTED)):
            parts += [prompt[-1:], answer]
            tags += [tag] * (answer.numel() + 1)
            pos += range(shared, shared + answer.numel() + 1)
            tgt += answer.tolist() + [-100]
        rows.append(torch.cat(parts))
        branches.append(tags)
        positions.append(pos)
        targets.append(tgt)
        # where each TRL log-prob lies in this packed row (TRL's position j predicts token j + 1): a chosen
        # token keeps its index, a rejected one sits after the chosen branch (its length + 1 further on)
        source[0].append(torch.arange(shared, shared + chosen.numel()))
        source[1].append(torch.arange(shared + chosen.numel() + 1, shared + chosen.numel() + 1 + rejected.numel()))
    width = max(r.numel() for r in rows)
    packed = input_ids.new_full((pairs, width), pad_id)
    branch = torch.full((pairs, width), PAD_BRANCH)
    position = torch.zeros((pairs, width), dtype=torch.long)
    shift_labels = torch.full((pairs, width), -100, dtype=labels.dtype)
    for i, row in enumerate(rows):
        n = row.numel()
        packed[i, :n], branch[i, :n] = row, torch.tensor(branches[i])
        position[i, :n], shift_labels[i, :n] = torch.tensor(positions[i]), torch.tensor(targets[i])
    flat_source = torch.cat([i * width + idx for per_pair in source for i, idx in enumerate(per_pair)])  # chosen rows, then rejected
    query, key = branch[:, :, None], branch[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & ((key == SHARED) | (key == query)) & (query != PAD_BRANCH)
    visible |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows (NaN)
    device = input_ids.device
    return {"input_ids": packed.to(device), "attention_mask": visible[:, None].to(device), "position_ids": position.to(device),
            "shift_labels": shift_labels.to(device), "source": flat_source.to(device)}


def _split(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, answer) token ids of one right-padded TRL row."""
    ids, labels = ids[mask.bool()], labels[mask.bool()]
    answer = (labels != -100).nonzero()
    start = int(answer[0]) if len(answer) else ids.numel()
    return ids[:start], ids[start:]


class SharedPromptModel:
    """Called like TRL calls the model (two rows per pair, ``labels``, ``fused_lm_head=True``); runs one packed row."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id

    def __call__(self, input_ids, attention_mask, labels, fused_lm_head=True, **kwargs):
        if not fused_lm_head:
            raise ValueError("the shared-prompt forward only scores labels (fused_lm_head=True)")
        packed = pack_pairs(input_ids, attention_mask, labels, self.pad_id)
        source = packed.pop("source")
        out = self.model(**packed, **kwargs, fused_lm_head=True)
        trl_mask = labels[:, 1:] != -100  # TRL's shifted layout: position j predicts token j + 1
        fields = {}
        for name in PER_TOKEN_FIELDS:
            value = getattr(out, name, None)
            if value is not None:  # masked_scatter keeps the autograd graph to the packed rows
                fields[name] = value.new_zeros(trl_mask.shape).masked_scatter(trl_mask, value.reshape(-1)[source])
        return FusedCausalLMOutput(loss=out.loss, aux_loss=getattr(out, "aux_loss", None), **fields)


class SharedPromptDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer whose policy and reference forwards evaluate each pair's prompt once."""

    def _shared(self, model):
        return SharedPromptModel(model, self.processing_class.pad_token_id)

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(self._shared(model), inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:  # TRL recomputes logits with a plain forward; keep its path
            return super()._compute_loss(model, inputs, return_outputs)
        return super()._compute_loss(self._shared(model), inputs, return_outputs)
