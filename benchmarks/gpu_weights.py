"""Random-init weights of the real shapes, from carried configs and tokenizers (a lent GPU machine reaches no hub):

    python benchmarks/gpu_weights.py .gpu-carry OUT      # writes OUT/llm and OUT/encoder

Speed and correctness on CUDA do not depend on the weights' values; texts from such a model are noise.
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM


def main(carry: str, out: str) -> int:
    carry, out = Path(carry), Path(out)
    for name, loader in (("llm", AutoModelForCausalLM), ("encoder", AutoModel)):
        target = out / name
        shutil.copytree(carry / name, target, dirs_exist_ok=True)
        torch.manual_seed(0)
        model = loader.from_config(AutoConfig.from_pretrained(target))
        model.save_pretrained(target)
        print(f"{target}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, random init")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
