"""vLLM backend for GPUs: same interface as the samplers in sampler.py.

Loaded only when ``generate.backend = "vllm"``; the Hugging Face model is
never loaded then (vLLM loads the weights itself, and both would not fit a GPU
at 8B). Round t samples from the base plus the DPO adapters of rounds
0..t-1: vLLM applies one LoRA per request, so the rounds' adapters are joined
into one by concatenating their low-rank factors (PEFT's "cat" combination:
x A0 B0 + x A1 B1 = x [A0 A1] [B0; B1], exact, nothing merged into the base
weights and nothing rounded away), cached by the adapters' contents. Each
prompt gets its own seed drawn from the batch's generator, so a rerun
repeats its texts. vLLM shares each prompt's prefix across its N samples by
itself (prefix caching), so the prompt is evaluated once here too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from dpo4rec.errors import InputError
from dpo4rec.generate.sampler import Completion, SamplerSettings

_VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32", "fp16": "float16"}
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class VLLMSampler:
    name = "vllm"
    device = "cpu"  # where the batch's seed generator lives: vLLM only reads seeds from it

    def __init__(self, base_folder: str, adapters, eos_ids: list[int], dtype: str = "auto"):
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise InputError("generate.backend=vllm needs vLLM on a GPU machine: pip install 'dpo4rec[vllm]'") from None
        self._vllm = vllm
        self.eos_ids = sorted(set(eos_ids))
        self.lora = None
        options = {}
        if adapters:
            folder, rank = joined_adapter(base_folder, [Path(a) for a in adapters])
            self.lora = LoRARequest(f"dpo_rounds_0_{len(adapters) - 1}", 1, str(folder))
            options = {"enable_lora": True, "max_loras": 1, "max_lora_rank": next((r for r in _LORA_RANKS if r >= rank), rank)}
        self.llm = vllm.LLM(model=base_folder, dtype=_VLLM_DTYPES.get(dtype, "auto"), enable_prefix_caching=True, **options)

    def sample(self, prompts: list[list[int]], settings: SamplerSettings, generator) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator, device=generator.device).tolist()
        results: list[list[Completion]] = [[] for _ in prompts]
        runs = []
        if settings.greedy:
            runs.append(self._vllm.SamplingParams(n=1, temperature=0.0, max_tokens=settings.max_new_tokens, stop_token_ids=self.eos_ids))
        if settings.n_samples:
            runs.append([self._vllm.SamplingParams(
                n=settings.n_samples, temperature=settings.temperature, top_p=settings.top_p,
                max_tokens=settings.max_new_tokens, seed=seed, stop_token_ids=self.eos_ids,
            ) for seed in seeds])
        for params in runs:
            for u, output in enumerate(self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora)):
                for choice in output.outputs:
                    ids = [t for t in choice.token_ids if t not in self.eos_ids]
                    results[u].append(Completion(ids, "stop" if choice.finish_reason == "stop" else "length"))
        return results


def joined_adapter(base_folder: str, adapters: list[Path]) -> tuple[Path, int]:
    """One LoRA adapter folder equal to all of ``adapters`` applied together, and its rank.

    One adapter is used as it is. Several are joined once and cached under the
    dpo4rec cache, keyed by the adapters' file contents (a retrained round gets
    a new folder).
    """
    from peft import PeftConfig

    from dpo4rec.artifacts import cache_root
    from dpo4rec.llm import attach_adapters, chain_names, load_base_model

    ranks = [PeftConfig.from_pretrained(str(a)).r for a in adapters]
    if len(adapters) == 1:
        return adapters[0], ranks[0]
    digest = hashlib.sha256()
    for adapter in adapters:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            digest.update((adapter / name).read_bytes())
    target = cache_root() / "vllm-adapters" / digest.hexdigest()[:16]
    if not (target / "adapter_config.json").is_file():
        peft = attach_adapters(load_base_model(base_folder, torch.float32, "cpu"), adapters)
        names = chain_names(adapters)
        peft.add_weighted_adapter(names, [1.0] * len(names), "joined", combination_type="cat")
        staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        peft.save_pretrained(str(staging), selected_adapters=["joined"])  # written to staging/joined/
        if not target.exists():
            os.rename(staging / "joined", target)
        shutil.rmtree(staging, ignore_errors=True)
    return target, sum(ranks)
