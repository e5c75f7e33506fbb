"""vLLM backend for GPUs: same interface as the samplers in sampler.py.

Loaded only when ``generate.backend = "vllm"``. vLLM shares each prompt's
prefix across its N samples by itself (prefix caching), so the prompt is
evaluated once here too.
"""

from __future__ import annotations

from dpo4rec.errors import InputError
from dpo4rec.generate.sampler import Completion, SamplerSettings


class VLLMSampler:
    name = "vllm"

    def __init__(self, model, eos_ids: list[int], pad_id: int):
        if getattr(model, "peft_config", None):
            # vLLM reads the base folder: it would sample from the base model, not the policy DPO trained
            raise InputError("generate.backend=vllm cannot sample with DPO adapters yet (rounds >= 1); use auto or hf")
        try:
            import vllm
        except ImportError:
            raise InputError("generate.backend=vllm needs vLLM on a GPU machine: pip install vllm") from None
        self._vllm = vllm
        # vLLM loads weights itself; it reads the folder the HF model came from.
        self.llm = vllm.LLM(model=model.name_or_path, dtype="auto", enable_prefix_caching=True)
        self.eos_ids = sorted(set(eos_ids))

    def sample(self, prompts: list[list[int]], settings: SamplerSettings, generator) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        seed = int(generator.initial_seed() % (2**31))
        results: list[list[Completion]] = [[] for _ in prompts]
        runs = []
        if settings.greedy:
            runs.append(self._vllm.SamplingParams(n=1, temperature=0.0, max_tokens=settings.max_new_tokens, stop_token_ids=self.eos_ids))
        if settings.n_samples:
            runs.append(self._vllm.SamplingParams(
                n=settings.n_samples, temperature=settings.temperature, top_p=settings.top_p,
                max_tokens=settings.max_new_tokens, seed=seed, stop_token_ids=self.eos_ids,
            ))
        for params in runs:
            for u, output in enumerate(self.llm.generate(inputs, params, use_tqdm=False)):
                for choice in output.outputs:
                    ids = [t for t in choice.token_ids if t not in self.eos_ids]
                    results[u].append(Completion(ids, "stop" if choice.finish_reason == "stop" else "length"))
        return results
