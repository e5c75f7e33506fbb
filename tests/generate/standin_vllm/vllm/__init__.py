"""A stand-in for vLLM (which needs a GPU) in the tests: it records what dpo4rec hands it and answers with fixed
tokens, so the weights and seeds given to vLLM can be checked on a CPU. Never shipped; vLLM itself was not run here."""

CREATED: list[dict] = []  # the keyword arguments of every LLM(...)
CALLS: list[dict] = []  # every generate(...): prompts, sampling params, LoRA request


class SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, seed=None, stop_token_ids=()):
        self.n, self.temperature, self.top_p, self.max_tokens, self.seed = n, temperature, top_p, max_tokens, seed
        self.stop_token_ids = list(stop_token_ids)


class _Choice:
    def __init__(self, token_ids, finish_reason):
        self.token_ids, self.finish_reason = token_ids, finish_reason


class _Output:
    def __init__(self, outputs):
        self.outputs = outputs


class LLM:
    def __init__(self, model, **kwargs):
        CREATED.append({"model": model, **kwargs})

    def generate(self, prompts, params, use_tqdm=True, lora_request=None):
        CALLS.append({"prompts": prompts, "params": params, "lora_request": lora_request})
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        return [_Output([_Choice([7, 8, p.stop_token_ids[0]], "stop") for _ in range(p.n)]) for p in per_prompt]
