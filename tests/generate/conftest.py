import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from dpo4rec.llm import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def model_fp32():
    from dpo4rec.llm import load_model

    return load_model("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder with data and prompts for 8 ML-100k users (short prompts)."""
    from dpo4rec.config import DataConfig, ModelConfig, PromptConfig
    from dpo4rec.data.stage import run_data_stage
    from dpo4rec.prompts.stage import run_prompt_stage

    run = tmp_path_factory.mktemp("run")
    run_data_stage(run, DataConfig(dataset="ml-100k", n_users=8, seed=0))
    run_prompt_stage(run, PromptConfig(max_prompt_tokens=160), ModelConfig())
    return run
