"""DPO on the knowledge-writing LLM: TRL's DPOTrainer with a LoRA adapter.

References across rounds: round t trains a fresh LoRA adapter on top of the
model that wrote round t's texts, i.e. the base model with the adapters of
rounds 0..t-1 applied, unmerged and frozen (llm.py says why not
merged). That same model, without the new adapter, is the reference, so
round t's reference is round t-1's policy, not the base. The adapters are
saved one per round; ``adapter_chain`` lists the folders to apply, in order,
to rebuild a round's model.

Reference log-probabilities are computed once per round, before training
(``precompute_ref_log_probs``), not at every step. With LoRA on the last K
layers only (``align.lora_layers``), that pass also records each pair's
hidden states below them, and the policy steps run the last K layers alone
(align/frozen_layers.py).

Several processes (GPUs, or CPU processes over gloo): ``accelerate launch
--num_processes K -m dpo4rec align --out RUN --round t`` runs TRL's trainer
under DDP; each process takes ``batch_size`` pairs per pass, so pairs per
optimizer step = K x batch_size x grad_accumulation; rank 0 alone writes the
adapter and holds the run folder's lock.

Speed on CPUs: TRL's fused LM head scores only the completion tokens on
CUDA, but on other devices it projects every position (prompt included)
through the 49k-word head in fp32; ``_score_completion_tokens_only`` makes
it take the CUDA path everywhere. Same log-probs (tested), 1.7-2.1x faster DPO
on a 2-core CPU (benchmarks/dpo.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from dpo4rec.artifacts import (
    MANIFEST, StageFolder, StageResult, begin_stage, damaged_output, fingerprint_file, read_json, read_parquet, round_dir, write_json,
)
from dpo4rec.config import AlignConfig, ModelConfig, to_dict
from dpo4rec.errors import InputError
from dpo4rec.runlock import launch_rank, launched

log = logging.getLogger(__name__)
STAGE = "align"


def adapter_chain(run_dir: str | Path, round_index: int) -> list[Path]:
    """Adapters that turn the base model into round ``round_index``'s model (rounds 0..t-1)."""
    chain = [round_dir(run_dir, t) / STAGE for t in range(round_index)]
    missing = [p for p in chain if not (p / MANIFEST).is_file()]
    if missing:
        raise InputError(f"{missing[0]}: no finished DPO adapter; round {round_index} needs rounds 0..{round_index - 1} aligned first")
    for folder in chain:
        damage = damaged_output(folder, read_json(folder / MANIFEST).get("outputs"))
        if damage:
            raise InputError(f"{folder}: {damage}; delete the folder and rerun its align stage")
    return chain


def run_align_stage(run_dir: str | Path, round_index: int, model_cfg: ModelConfig, align: AlignConfig) -> StageResult:
    """Train round ``round_index``'s LoRA adapter on its preference pairs (the summary: the training log)."""
    run_dir = Path(run_dir)
    round_folder = round_dir(run_dir, round_index)
    pairs_file = round_folder / "reward" / "pairs.parquet"
    if not pairs_file.is_file():
        raise InputError(f"{pairs_file} not found; run the reward stage for round {round_index} first")
    chain = adapter_chain(run_dir, round_index)
    inputs = {"pairs.parquet": fingerprint_file(pairs_file)}
    inputs.update({f"chain/{p.parent.name}": fingerprint_file(p / "adapter_model.safetensors") for p in chain})
    folder = round_folder / STAGE
    manifest, done = begin_stage(folder, STAGE, {"align": to_dict(align), "model": model_cfg.name}, inputs, summary="training_log.json")
    if done:
        return done
    pairs = read_parquet(pairs_file)
    shared = round_folder / ".dpo-dataset" if launched() else None
    if launch_rank() > 0:  # another process of `accelerate launch`: trains along (DDP needs every rank), writes nothing
        history = {}
        if len(pairs):  # without pairs rank 0 only writes an untrained adapter: nothing to do along
            with tempfile.TemporaryDirectory() as scratch:
                history = train_dpo(pairs, model_cfg, align, chain, Path(scratch), shared)
        _barrier()  # rank 0 removes the shared pairs after this
        return StageResult(folder, history, False)
    with StageFolder(folder, manifest) as tmp:
        if len(pairs) == 0:  # every user's samples tied: nothing to learn, the next round's model is this one
            log.warning("%s: no preference pairs (every user's samples tied); round %d keeps its model", pairs_file, round_index)
            history = write_identity_adapter(model_cfg, align, chain, tmp)
        else:
            history = train_dpo(pairs, model_cfg, align, chain, tmp, shared)
    if shared is not None:
        _barrier()  # every rank is done with the shared pairs
        shutil.rmtree(shared, ignore_errors=True)
    return StageResult(folder, history, False)


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def launch_align_stage(run_dir: str | Path, round_index: int, model_cfg: ModelConfig, align: AlignConfig) -> StageResult:
    """``run_align_stage``, as ``align.processes`` processes of ``accelerate launch`` when that is more than one.

    The launched processes read the run's config.json and run ``dpo4rec align``; this process keeps the run
    folder's lock (they are told so by DPO4REC_RUN_LOCKED) and reads back what rank 0 wrote.
    """
    import subprocess
    import sys

    if align.processes == 1:
        return run_align_stage(run_dir, round_index, model_cfg, align)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(align.processes),
               "--num_machines", "1", "--dynamo_backend", "no", "-m", "dpo4rec", "align", "--out", str(run_dir), "--round", str(round_index)]
    log.info("align: %s", " ".join(command[2:]))
    done = subprocess.run(command, env={**os.environ, "DPO4REC_RUN_LOCKED": str(os.getpid())}, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise InputError(f"accelerate launch of the align stage (round {round_index}, {align.processes} processes) failed: {last[0]}")
    return run_align_stage(run_dir, round_index, model_cfg, align)  # reused: rank 0 wrote it


def write_identity_adapter(model_cfg: ModelConfig, align: AlignConfig, chain: list[Path], out: Path) -> dict:
    """An untrained LoRA adapter (its B matrices are zero, so applying it changes nothing) and a log that says so."""
    from peft import get_peft_model

    from dpo4rec.llm import load_base_model

    model = load_base_model(model_cfg.name, device="cpu")  # the adapter's shapes come from the base alone
    get_peft_model(model, _lora_config(align, model)).save_pretrained(out)
    history = {"pairs": 0, "train_runtime_s": 0.0, "steps": [], "skipped": "no preference pairs: every user's samples tied",
               "reference": _reference(chain), "chain": [f"{p.parent.name}/{p.name}" for p in chain]}
    write_json(out / "training_log.json", history)
    return history


def _lora_config(align: AlignConfig, model):
    """LoRA on every linear layer of the decoder (PEFT's "all-linear"), or of its last ``align.lora_layers`` layers."""
    import torch
    from peft import LoraConfig

    targets, top = "all-linear", None
    if align.lora_layers:
        layers = model.config.num_hidden_layers
        if align.lora_layers > layers:
            raise InputError(f"align.lora_layers must be at most the model's {layers} decoder layers, got {align.lora_layers}")
        top = list(range(layers - align.lora_layers, layers))
        # PEFT takes layers_to_transform only with named modules: the decoder's linear ones, as "all-linear" finds
        found = set()
        for name, module in model.named_modules():
            parts = name.split(".")
            if not isinstance(module, torch.nn.Linear) or "layers" not in parts or any(p.startswith("lora_") for p in parts):
                continue
            found.add(parts[-2] if parts[-1] == "base_layer" else parts[-1])  # a layer an earlier round's LoRA wraps
        targets = sorted(found)
    return LoraConfig(r=align.lora_r, lora_alpha=align.lora_alpha, lora_dropout=align.lora_dropout,
                      target_modules=targets, layers_to_transform=top, task_type="CAUSAL_LM")


def _reference(chain: list[Path]) -> str:
    return "base model" if not chain else f"base + {', '.join(p.parent.name for p in chain)} adapters (the previous round's policy)"


def _score_completion_tokens_only() -> None:
    """Let TRL's fused LM head project only labelled (completion) positions on every device.

    TRL 1.16 picks that "compact" path only where Triton runs, because on
    Neuron a data-dependent shape recompiles the graph; eager CPU has no such
    cost, and prompts are ~90% of our tokens. Only the trainer module's choice
    is changed; the kernel module still runs its plain-torch tiles on a CPU.
    """
    import trl.trainer.utils as trl_utils

    if not getattr(trl_utils, "_dpo4rec_compact", False) and hasattr(trl_utils, "_use_triton"):
        kernel_choice = trl_utils._use_triton
        trl_utils._use_triton = lambda device: device.type == "cpu" or kernel_choice(device)
        trl_utils._dpo4rec_compact = True


def policy_and_reference(model_cfg: ModelConfig, align: AlignConfig, chain: list[Path], dtype):
    """The model DPO trains, its reference, and the LoRA config to hand TRL (None when the policy is built here).

    Round 0: the base model, and TRL adds the adapter (its reference is the
    base with the adapter switched off). Later rounds: base + the earlier
    rounds' adapters (frozen, unmerged) + a fresh trainable adapter named
    "default"; the reference is base + the earlier adapters, given to TRL as
    a model of its own because switching adapters off would fall back to the base.
    """
    from dpo4rec.llm import attach_adapters, chain_names, load_base_model, load_model, model_device

    device = model_device(model_cfg)
    if not chain:
        model = load_base_model(model_cfg.name, dtype, device)
        return model.train(), None, _lora_config(align, model)
    from transformers import set_seed

    policy = attach_adapters(load_base_model(model_cfg.name, dtype, device), chain)
    set_seed(align.seed)  # the new adapter's random init (TRL seeds only the adapters it adds itself)
    policy.add_adapter("default", _lora_config(align, policy))
    frozen = chain_names(chain)
    policy.base_model.set_adapter([*frozen, "default"])
    for name, param in policy.named_parameters():
        param.requires_grad = ".default." in name
    reference = load_model(model_cfg.name, adapters=chain, dtype=dtype, device=device)
    return policy.train(), reference, None


def _shared_dataset(rows: dict, folder: Path, args):
    """The pairs as a dataset on disk that every process of a launch reads: TRL finds the files it maps (tokens,
    reference log-probs) beside a dataset's own files, and rank 0 writes them for all (in-memory datasets would
    each keep them in a private temporary folder). ``args``: the trainer's arguments, whose setup joins the
    processes (so rank 0 really goes first)."""
    from datasets import Dataset, load_from_disk

    with args.main_process_first(local=False, desc="the shared DPO pairs"):
        if args.process_index == 0:
            shutil.rmtree(folder, ignore_errors=True)
            Dataset.from_dict(rows).save_to_disk(str(folder))
        return load_from_disk(str(folder))


def train_dpo(pairs: pd.DataFrame, model_cfg: ModelConfig, align: AlignConfig, chain: list[Path], out: Path,
              shared_dir: Path | None = None) -> dict:
    """Fit the adapter; write it (adapter_model.safetensors, adapter_config.json) and training_log.json to ``out``.

    ``shared_dir``: a folder every process can read, for the pairs of a multi-process launch."""
    import torch
    from datasets import Dataset
    from peft.helpers import disable_input_dtype_casting
    from trl import DPOConfig, DPOTrainer

    from dpo4rec.align.frozen_layers import FrozenLayers
    from dpo4rec.align.shared_prompt import SharedPromptDPOTrainer
    from dpo4rec.llm import load_tokenizer, model_device, parse_dtype

    os.environ.setdefault("WANDB_DISABLED", "true")
    _score_completion_tokens_only()
    tokenizer = load_tokenizer(model_cfg.name)
    device = model_device(model_cfg)
    dtype = parse_dtype(model_cfg.dtype, device)
    model, ref_model, peft_config = policy_and_reference(model_cfg, align, chain, dtype)
    args = DPOConfig(
        output_dir=str(out / "trainer"),
        beta=align.beta,
        loss_type=[align.loss, "sft"] if align.sft_weight else [align.loss],
        loss_weights=[1.0, align.sft_weight] if align.sft_weight else None,
        learning_rate=align.learning_rate,
        num_train_epochs=align.epochs,
        per_device_train_batch_size=align.batch_size,
        gradient_accumulation_steps=align.grad_accumulation,
        max_length=align.max_length,
        activation_checkpointing=align.gradient_checkpointing,  # transformers 5's name (the old one warns)
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=max(8, align.batch_size * 2),
        bf16=dtype == torch.bfloat16,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=align.seed,
        data_seed=align.seed,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    # conversational rows: TRL applies the same chat template the sampler used
    rows = {
        "prompt": [[{"role": "user", "content": p}] for p in pairs["prompt"]],
        "chosen": [[{"role": "assistant", "content": c}] for c in pairs["chosen"]],
        "rejected": [[{"role": "assistant", "content": r}] for r in pairs["rejected"]],
    }
    dataset = Dataset.from_dict(rows) if shared_dir is None else _shared_dataset(rows, shared_dir, args)
    trainer_cls = SharedPromptDPOTrainer if align.shared_prompt else DPOTrainer
    trainer = trainer_cls(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    # LoRA weights stay fp32 (small updates must not round away), but PEFT casts each layer's bf16 input up
    # to them; under the trainer's bf16 autocast that copy is wasted (~10% of a CPU step)
    with disable_input_dtype_casting(trainer.model) if dtype == torch.bfloat16 else contextlib.nullcontext():
        result = trainer.train()
    trainer.model.save_pretrained(out, selected_adapters=["default"])
    shutil.rmtree(out / "trainer", ignore_errors=True)
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    history = {
        "pairs": len(pairs),
        "train_runtime_s": result.metrics.get("train_runtime"),
        "steps": [{k: entry.get(k) for k in ("step", "epoch", "loss", "rewards/accuracies", "rewards/margins",
                                             "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")}
                  for entry in steps],
        "reference": _reference(chain),
        "chain": [f"{p.parent.name}/{p.name}" for p in chain],
        # how many packed rows of the policy steps ran the decoder from which layer on, below it the reference pass's
        # states (frozen_layers.py); 0: every layer, every time
        "frozen_layers": (getattr(trainer, "_frozen", None) or FrozenLayers(None, enabled=False)).summary(),
    }
    write_json(out / "training_log.json", history)
    return history
