"""DPO with each prompt evaluated once: TRL's trainer and loss, one packed row per user.

TRL's DPOTrainer puts ``prompt + chosen`` and ``prompt + rejected`` in two
rows, so the ~530-token prompt runs twice for a ~60-token answer. Here the
rows of a batch that share a prompt (a user's pairs, which
``PromptGroupedSampler`` keeps together) become one packed row,

    prompt[:-1] | prompt[-1] answer_1 | prompt[-1] answer_2 | ...

with each distinct answer once, however many pairs it is in: one pair is
``prompt | chosen | rejected``; a user's 3 x 3 ``top_bottom`` pairs are the
prompt and 6 answers, 9 pairs for ~1.4x the cost of one. Each branch sees
the shared part and itself (a block attention mask) and restarts its
positions where the prompt ends. The prompt's last token appears once per
branch because it predicts each answer's first token, and one position can
carry only one label. The backbone runs on the packed rows, TRL's own fused
LM head scores the labelled positions (``shift_labels``), and the per-token
outputs are put back into TRL's two-row layout, so TRL's loss, reference
log-probs and metrics run unchanged on them.

Attention runs by segments (``pair_attention``): the shared part causally on
itself, each branch on the shared part and itself. The block mask does the
same in one call, but a kernel given a mask computes every block of the
(length x length) scores and cannot skip the causal upper half: on a 2-core
CPU the masked kernel's forward and backward were ~40% of a DPO step, for
~2x the attention work that the segments need. On a GPU the trade reverses:
the segments cost ~30 small kernels per row and layer, and launches, not
arithmetic, bound a 135M model there (a 16-pair step of the real model took
7 s on an H200 by segments), so GPUs take the one masked call per layer
(``SEGMENT_DEVICES``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from trl import DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from dpo4rec.align.frozen_layers import FrozenLayers, unwrapped

PAD_BRANCH, SHARED = -1, 0  # branch tags: padding, the shared prompt; answers are 1, 2, ...
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int) -> dict:
    """TRL's ``[chosen rows; rejected rows]`` batch as one packed row per distinct prompt (``pack_answers``).

    The pairs of a batch that share a prompt (a user's pairs, kept together by
    ``PromptGroupedSampler``) share one row, and each distinct answer among
    them is one branch of it, evaluated once however many pairs it is in.
    Returns ``pack_answers``'s model inputs and ``source``: for each labelled
    position of TRL's shifted layout, in row-major order, the flat index in
    the packed rows that holds its log-prob.
    """
    groups: dict[tuple, tuple[int, torch.Tensor, dict[tuple, int], list[torch.Tensor]]] = {}  # prompt -> (row, ids, answer -> branch, answers)
    row_branch = []  # per TRL row, in order: (packed row, branch)
    for r in range(input_ids.size(0)):
        prompt, answer = _split(input_ids[r], attention_mask[r], labels[r])
        row, _, branch_of, answers = groups.setdefault(tuple(prompt.tolist()), (len(groups), prompt, {}, []))
        key = tuple(answer.tolist())
        if key not in branch_of:
            branch_of[key] = len(answers)
            answers.append(answer)
        row_branch.append((row, branch_of[key]))
    packed = pack_answers([(prompt, answers) for _, prompt, _, answers in groups.values()], pad_id, labels.dtype)
    width, starts = packed["input_ids"].size(1), packed.pop("answer_starts")
    lengths = [[a.numel() for a in answers] for *_, answers in groups.values()]
    source = torch.cat([i * width + starts[i][b] + torch.arange(lengths[i][b]) for i, b in row_branch])
    return {**packed, "source": source.to(input_ids.device)}


def pack_answers(groups: list[tuple[torch.Tensor, list[torch.Tensor]]], pad_id: int, label_dtype=torch.long) -> dict:
    """One packed row per (prompt ids, answers ids) group: ``prompt[:-1] | prompt[-1] answer_1 | prompt[-1] answer_2 | ...``.

    Returns the model inputs (``input_ids``, a boolean 4D ``attention_mask``,
    ``position_ids``, ``shift_labels``), ``pair_layout`` (per row, the shared
    length and each branch's length, for ``pair_attention``) and
    ``answer_starts`` (per row and answer, the position whose output predicts
    the answer's first token: TRL's position j predicts token j + 1).
    """
    rows, branches, positions, targets, starts, layout = [], [], [], [], [], []
    for prompt, answers in groups:
        shared = prompt.numel() - 1
        parts, tags, pos, tgt, begin = [prompt[:-1]], [SHARED] * shared, list(range(shared)), [-100] * shared, []
        for tag, answer in enumerate(answers, start=1):
            begin.append(len(tags))  # the copy of prompt[-1] that opens this branch
            parts += [prompt[-1:], answer]
            tags += [tag] * (answer.numel() + 1)
            pos += range(shared, shared + answer.numel() + 1)
            tgt += answer.tolist() + [-100]
        rows.append(torch.cat(parts))
        layout.append((shared, *(a.numel() + 1 for a in answers)))
        branches.append(tags)
        positions.append(pos)
        targets.append(tgt)
        starts.append(begin)
    width = max(r.numel() for r in rows)
    packed = rows[0].new_full((len(rows), width), pad_id)
    branch = torch.full((len(rows), width), PAD_BRANCH)
    position = torch.zeros((len(rows), width), dtype=torch.long)
    shift_labels = torch.full((len(rows), width), -100, dtype=label_dtype)
    for i, row in enumerate(rows):
        n = row.numel()
        packed[i, :n], branch[i, :n] = row, torch.tensor(branches[i])
        position[i, :n], shift_labels[i, :n] = torch.tensor(positions[i]), torch.tensor(targets[i])
    query, key = branch[:, :, None], branch[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & ((key == SHARED) | (key == query)) & (query != PAD_BRANCH)
    visible |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows (NaN)
    device = rows[0].device
    return {"input_ids": packed, "attention_mask": visible[:, None].to(device), "position_ids": position.to(device),
            "shift_labels": shift_labels.to(device), "pair_layout": layout, "answer_starts": starts}


PAIR_ATTENTION = "dpo4rec_pairs"
SEGMENT_DEVICES = ("cpu",)
"""Device types whose attention runs by segments; elsewhere the block mask in one call (module docstring)."""


def pair_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, pair_layout=None, **kwargs):
    """Attention of packed pair rows by segments on the devices in ``SEGMENT_DEVICES``; elsewhere, or without
    ``pair_layout``, the model's usual SDPA with the (block) mask.

    Per row: the shared part attends causally to itself (the kernel skips the upper half); each branch
    attends to the shared part and causally to itself (a small bottom-right causal mask over
    [shared; branch]); padding gets zeros (its positions carry no label). Same result as the block mask.
    """
    if pair_layout is None or query.device.type not in SEGMENT_DEVICES:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    _, heads, length, dim = query.shape
    rows = []
    for b, (shared, *branch_lengths) in enumerate(pair_layout):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        parts = []
        if shared:
            parts.append(F.scaled_dot_product_attention(q[:, :, :shared], k[:, :, :shared], v[:, :, :shared],
                                                        dropout_p=dropout, is_causal=True, scale=scaling))
        start = shared
        for n in branch_lengths:
            keys = torch.cat([k[:, :, :shared], k[:, :, start : start + n]], dim=2)
            values = torch.cat([v[:, :, :shared], v[:, :, start : start + n]], dim=2)
            sees = torch.ones(n, shared + n, dtype=torch.bool, device=q.device).tril(diagonal=shared)
            parts.append(F.scaled_dot_product_attention(q[:, :, start : start + n], keys, values, attn_mask=sees,
                                                        dropout_p=dropout, scale=scaling))
            start += n
        if length > start:
            parts.append(q.new_zeros(1, heads, length - start, dim))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(PAIR_ATTENTION, pair_attention)


def use_pair_attention(model) -> None:
    """Route the model's attention through ``pair_attention`` (which falls back to SDPA for plain calls)."""
    base = unwrapped(model)
    if base.config._attn_implementation != PAIR_ATTENTION:
        base.set_attn_implementation(PAIR_ATTENTION)


def _split(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, answer) token ids of one right-padded TRL row."""
    ids, labels = ids[mask.bool()], labels[mask.bool()]
    answer = (labels != -100).nonzero()
    start = int(answer[0]) if len(answer) else ids.numel()
    return ids[:start], ids[start:]


class SharedPromptModel:
    """Called like TRL calls the model (two rows per pair, ``labels``, ``fused_lm_head=True``); runs one packed row per
    distinct prompt of the batch, from the first adapted layer where ``frozen`` holds the rows' states below it."""

    def __init__(self, model, pad_id: int, frozen: FrozenLayers | None = None):
        self.model, self.pad_id = model, pad_id
        self.frozen = frozen or FrozenLayers(model, enabled=False)
        use_pair_attention(model)

    def __call__(self, input_ids, attention_mask, labels, fused_lm_head=True, **kwargs):
        if not fused_lm_head:
            raise ValueError("the shared-prompt forward only scores labels (fused_lm_head=True)")
        packed = pack_pairs(input_ids, attention_mask, labels, self.pad_id)
        source = packed.pop("source")
        keys = self.frozen.row_keys(packed["input_ids"], packed["pair_layout"])
        out = self.frozen(self.model, keys, {**packed, **kwargs, "fused_lm_head": True})
        trl_mask = labels[:, 1:] != -100  # TRL's shifted layout: position j predicts token j + 1
        fields = {}
        for name in PER_TOKEN_FIELDS:
            value = getattr(out, name, None)
            if value is not None:  # masked_scatter keeps the autograd graph to the packed rows
                fields[name] = value.new_zeros(trl_mask.shape).masked_scatter(trl_mask, value.reshape(-1)[source])
        return FusedCausalLMOutput(loss=out.loss, aux_loss=getattr(out, "aux_loss", None), **fields)


class PromptGroupedSampler(torch.utils.data.Sampler):
    """Prompts (users) in a random order, each prompt's pairs one after another.

    TRL's random order scatters a user's pairs over the epoch, so each would
    pay for the ~530-token prompt again; kept together, the pairs of a user
    fill a batch (whole users when the batch size is a multiple of the pairs
    per user) and share one packed row, each distinct answer evaluated once.
    The loss is the same mean over the batch's pairs; what changes is which
    pairs share an optimizer step. Seeded like the trainer's data order, a new
    order each epoch: with one pair per user (``best_worst``) the order is the
    trainer's own (accelerate's seeded random order), so such runs train on
    the same batches as without this sampler.
    """

    def __init__(self, prompt_ids: list, seed: int):
        members: dict[tuple, list[int]] = {}
        for index, prompt in enumerate(prompt_ids):
            members.setdefault(tuple(prompt), []).append(index)
        self.groups, self.seed, self.epoch = list(members.values()), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(group) for group in self.groups)

    def __iter__(self):
        order = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for group in order.tolist():
            yield from self.groups[group]


class SharedPromptDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer whose policy and reference forwards evaluate each distinct prompt and answer of a batch once,
    with a user's pairs kept together in batches (``PromptGroupedSampler``).

    With adapters on the top layers only, the reference pass records each row's hidden states below them and
    the policy steps start from those (``FrozenLayers``); ``reuse_frozen_layers = False`` runs every layer
    every time (benchmarks/dpo.py compares the two)."""

    reuse_frozen_layers = True

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if "prompt_ids" not in getattr(dataset, "column_names", ()):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return PromptGroupedSampler(dataset["prompt_ids"], seed)

    def _shared(self, model):
        if getattr(self, "_frozen", None) is None:  # one record for the whole training: the reference pass fills it
            # one process, no activation checkpointing: the settings the reuse is tested in
            enabled = self.reuse_frozen_layers and not self.args.gradient_checkpointing and self.args.world_size == 1
            self._frozen = FrozenLayers(self.model, enabled=enabled)
        return SharedPromptModel(model, self.processing_class.pad_token_id, self._frozen)

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(self._shared(model), inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:  # TRL recomputes logits with a plain forward; keep its path
            return super()._compute_loss(model, inputs, return_outputs)
        return super()._compute_loss(self._shared(model), inputs, return_outputs)
