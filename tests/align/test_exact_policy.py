"""The next round samples from exactly the policy DPO trained (issue: bf16 merges lost ~98% of the update).

A DPO round at a realistic learning rate changes each weight by ~1e-4 of
its norm. The log-prob change it causes is measured with fp32 arithmetic on
the models' own weights (the bf16 base is exact in fp32), so that what is
compared is the weights each path holds, not bf16 rounding noise in the
activations: the trained policy (base + adapter, as PEFT trains it), the
generation model (``load_model`` with the adapter, run by our shared-prefix
sampler) and, to show that the check has teeth, the old bf16 merge.
"""

import os

import pandas as pd
import pytest
import torch

from dpo4rec.align.dpo import run_align_stage
from dpo4rec.heldout.stage import completion_ids
from dpo4rec.config import AlignConfig, ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Describe user {i}, who watched musicals and family dramas in the nineties."
CHOSEN = "This user loves old musicals and family dramas with warm, hopeful endings."
REJECTED = "The user watched some movies. Movies are films. They watched them."


def hf_logps(model, prompt_ids, answer_ids) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer_ids)[:, None])[:, 0]


def sampler_logps(model, prompt_ids, answer_ids) -> torch.Tensor:
    """Per-token log-probs of ``answer_ids`` as the shared-prefix sampler computes them (teacher-forced)."""
    from dpo4rec.generate.fast_llama import DecodeState, FastLlama

    fast = FastLlama(model)
    lengths = torch.tensor([len(prompt_ids)])
    keys, values, logits = fast.prefill(torch.tensor([prompt_ids]), lengths)
    state = DecodeState(keys, values, lengths, 1, len(answer_ids))
    out = [torch.log_softmax(logits[0].float(), -1)[answer_ids[0]]]
    for t in range(len(answer_ids) - 1):
        state.step = t
        logits = fast.decode_step(torch.tensor([[answer_ids[t]]]), torch.tensor([[len(prompt_ids) + t]]), state)
        out.append(torch.log_softmax(logits[0, 0].float(), -1)[answer_ids[t + 1]])
    return torch.stack(out)


@pytest.mark.slow
def test_next_round_samples_the_policy_dpo_trained(tmp_path):
    from peft import PeftModel

    from dpo4rec.llm import load_base_model, load_model, load_tokenizer

    folder = tmp_path / "round_0" / "reward"
    folder.mkdir(parents=True)
    pd.DataFrame({"user_index": range(4), "prompt": [PROMPT.format(i=i) for i in range(4)],
                  "chosen": [CHOSEN] * 4, "rejected": [REJECTED] * 4,
                  "reward_chosen": [0.8] * 4, "reward_rejected": [0.2] * 4}).to_parquet(folder / "pairs.parquet")
    align = AlignConfig(learning_rate=5e-5, batch_size=2, grad_accumulation=1, epochs=2, max_length=128)
    result = run_align_stage(tmp_path, 0, ModelConfig(dtype="bf16"), align)
    adapter, log = result.folder, result.summary
    assert len(log["steps"]) == 4

    tokenizer = load_tokenizer("smollm2-135m")
    base = load_base_model("smollm2-135m", torch.bfloat16).float().eval()  # bf16 weights, fp32 arithmetic
    trained = PeftModel.from_pretrained(load_base_model("smollm2-135m", torch.bfloat16), str(adapter)).float().eval()
    generation = load_model("smollm2-135m", adapters=[adapter], dtype=torch.bfloat16).float()
    merged = PeftModel.from_pretrained(load_base_model("smollm2-135m", torch.bfloat16), str(adapter)).merge_and_unload()
    merged = merged.float().eval()  # what load_model did before: merge into the bf16 weights

    for answer in (CHOSEN, REJECTED):
        ids = completion_ids(tokenizer, PROMPT.format(i=0), answer)
        start = hf_logps(base, *ids)
        change = hf_logps(trained, *ids) - start
        assert change.abs().sum() > 0.01  # DPO moved this text's log-probs measurably
        in_sampler = sampler_logps(generation, *ids) - sampler_logps(base, *ids)
        in_hf = hf_logps(generation, *ids) - start
        for seen in (in_sampler, in_hf):
            assert (seen - change).norm() <= 0.1 * change.norm()
            assert abs(seen.sum() - change.sum()) <= 0.1 * abs(change.sum())
        lost = hf_logps(merged, *ids) - start
        assert (lost - change).norm() > 0.5 * change.norm()  # the bf16 merge dropped most of the update
