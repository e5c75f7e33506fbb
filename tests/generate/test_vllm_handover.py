"""generate.backend = "vllm" on a CPU machine, with a stand-in vllm module (vLLM itself needs a GPU and was never
run here): round t hands vLLM the base folder plus one LoRA equal to the DPO adapters of rounds 0..t-1."""

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpo4rec.config import GenerateConfig, ModelConfig
from dpo4rec.llm import attach_adapters, load_base_model, resolve_model
from dpo4rec.generate.sampler import SamplerSettings, batch_generator
from dpo4rec.generate.stage import _open_sampler, run_generate_stage


@pytest.fixture
def standin_vllm(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "standin_vllm"))
    import vllm

    vllm.CREATED.clear()
    vllm.CALLS.clear()
    yield vllm
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]  # later tests must not find the stand-in


def random_adapter(folder: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(load_base_model("smollm2-135m", torch.float32, "cpu"), config).save_pretrained(folder)
    return folder


def merged_weights(adapters) -> dict[str, torch.Tensor]:
    return attach_adapters(load_base_model("smollm2-135m", torch.float32, "cpu"), adapters).merge_and_unload().state_dict()


def test_round_2_hands_vllm_the_base_and_one_lora_equal_to_both_rounds_adapters(standin_vllm, tiny_run, tmp_path):
    adapters = [random_adapter(tmp_path / "round_0", 0), random_adapter(tmp_path / "round_1", 1)]
    gen = GenerateConfig(backend="vllm", n_samples=3, max_new_tokens=8, sampled_train_users=2, sampled_validation_users=1)
    result = run_generate_stage(tiny_run, 2, ModelConfig(), gen, adapters=adapters)
    created = standin_vllm.CREATED[-1]
    assert created["model"] == resolve_model("smollm2-135m")  # the base folder: no merged copy of anything
    assert created["enable_lora"] and created["max_lora_rank"] == 8  # two rank-4 adapters joined
    lora = {call["lora_request"].lora_path for call in standin_vllm.CALLS}
    assert len(lora) == 1  # every request of the round carries the joined adapter
    joined = merged_weights([Path(lora.pop())])
    expected = merged_weights(adapters)
    assert joined.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(joined[name], weight, rtol=0, atol=1e-5, msg=name)
    base = load_base_model("smollm2-135m", torch.float32, "cpu").state_dict()
    assert max(float((joined[n] - w).abs().max()) for n, w in base.items()) > 1e-3  # the adapters changed something
    # every sampled prompt has its own seed; the texts reached the round's knowledge file
    sampled = [p for call in standin_vllm.CALLS if isinstance(call["params"], list) for p in call["params"]]
    assert len({p.seed for p in sampled}) == len(sampled) > 1
    knowledge = pd.read_parquet(result.folder / "knowledge.parquet")
    assert (knowledge["n_tokens"] == 2).all()


def test_round_1_uses_its_adapter_as_it_is_and_seeds_repeat(standin_vllm, tmp_path):
    adapter = random_adapter(tmp_path / "round_0", 2)
    tokenizer, sampler, _ = _open_sampler(ModelConfig(), GenerateConfig(backend="vllm"), adapters=[adapter])
    prompts = [tokenizer("a user who likes")["input_ids"], tokenizer("films about")["input_ids"]]
    settings = SamplerSettings(n_samples=2, max_new_tokens=4)
    first = sampler.sample(prompts, settings, batch_generator(5, 3, sampler.device))
    again = sampler.sample(prompts, settings, batch_generator(5, 3, sampler.device))
    assert [[c.token_ids for c in user] for user in first] == [[c.token_ids for c in user] for user in again]
    seeds = [[p.seed for p in call["params"]] for call in standin_vllm.CALLS if isinstance(call["params"], list)]
    assert seeds[0] == seeds[1] and len(set(seeds[0])) == 2
    assert {call["lora_request"].lora_path for call in standin_vllm.CALLS} == {str(adapter)}
    _, base_only, _ = _open_sampler(ModelConfig(), GenerateConfig(backend="vllm"))  # round 0: no LoRA at all
    assert base_only.lora is None and "enable_lora" not in standin_vllm.CREATED[-1]
