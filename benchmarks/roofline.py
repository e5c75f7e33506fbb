"""The limit a benchmark is held to: this machine's matrix-product rate on the model's own layer shapes.

Machines differ (a 2-core CPU with AMX runs bf16 products ~5x faster than one
without), so the benchmarks report their speed as a share of a limit measured
in the same process: the FLOPs the work needs at minimum divided by the rate
measured here. The minimum counts every linear layer for each token that must
pass through it, the LM head only where a log-prob or a next token is needed,
and attention from the real lengths; elementwise work, norms and the optimizer
count as free, so the limit is optimistic. The decoder layers' products and the
LM head's are timed apart (on a 2-core CPU their rates differed by up to 2x, either way) and the limit is
the sum of each kind's FLOPs at its own rate.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def layer_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every linear layer a token passes through once (one decoder layer's worth, times the layers)."""
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name and "lora_" not in name:
            shapes.append((module.in_features, module.out_features))
    return shapes


def _rate(operands: list[tuple[torch.Tensor, torch.Tensor]], seconds: float) -> float:
    """Best FLOP/s of three timed passes over ``operands`` (x, w): other work on the machine only lowers a rate."""
    device = operands[0][0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # GPU products run asynchronously
    for x, w in operands:  # warm up
        x @ w.T
    best = 0.0
    for _ in range(3):
        flops = 0.0
        sync()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            for _ in range(10 if device.type == "cuda" else 1):  # enough queued work between clock reads
                for x, w in operands:
                    x @ w.T
                    flops += 2.0 * x.shape[0] * x.shape[1] * w.shape[0]
            sync()
        best = max(best, flops / (time.perf_counter() - start))
    return best


def measured_rates(model, dtype: torch.dtype, row_counts: tuple[int, ...] = (512, 4096), seconds: float = 2.0) -> dict[str, float]:
    """Matrix-product FLOP/s on the decoder layers' linear shapes (each once, as a token passes them: the mix the
    work has) and on the LM head apart: the head's one wide product runs at a rate of its own (on a 2-core CPU,
    up to 2x off the layers'), and a token needs it only where a next token or a log-prob is read, so one
    averaged rate would misstate the limit of work that is mostly layers. Each kind's best over ``row_counts``
    tokens at a time: a GPU needs thousands of rows before launches stop bounding the layers' small products."""
    head = model.get_output_embeddings().weight
    device = head.device
    shapes = layer_shapes(model)
    kinds = {"layers": shapes[: len(shapes) // model.config.num_hidden_layers], "head": [(head.shape[1], head.shape[0])]}
    rates = {kind: 0.0 for kind in kinds}
    for rows in row_counts:
        for kind, kind_shapes in kinds.items():
            operands = [(torch.randn(rows, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device))
                        for k, n in kind_shapes]
            rates[kind] = max(rates[kind], _rate(operands, seconds))
    return rates


class FlopCounter:
    """Minimum forward FLOPs of a decoder-only model, from its config, by kind of product: the decoder layers'
    linear maps and attention (timed at the layers' rate) and the LM head (at its own)."""

    def __init__(self, model):
        config = model.config
        self.linear_per_token = 2.0 * sum(i * o for i, o in layer_shapes(model))
        head = model.get_output_embeddings().weight
        self.head_per_token = 2.0 * head.shape[0] * head.shape[1]
        self.layers = config.num_hidden_layers
        self.attention_width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)

    def attention(self, queries: int, context_before: int) -> float:
        """QK^T and PV for ``queries`` causal tokens that follow ``context_before`` tokens."""
        keys = queries * context_before + queries * (queries + 1) / 2
        return 4.0 * self.attention_width * keys * self.layers

    def prompt_and_answers(self, prompt: int, answers: list[int]) -> dict[str, float]:
        """One prompt evaluated once, each answer against it, the LM head on the answers' tokens only."""
        layers = prompt * self.linear_per_token + self.attention(prompt, 0)
        for n in answers:
            layers += n * self.linear_per_token + self.attention(n, prompt)
        return {"layers": layers, "head": sum(answers) * self.head_per_token}


def best_rates(*measurements: dict[str, float]) -> dict[str, float]:
    """Each kind's best rate over measurements taken at different times of a run (before and after the timed
    work): a shared machine's rate drifts by up to 2x over minutes, and the limit is what it can do at best."""
    return {kind: max(m[kind] for m in measurements) for kind in measurements[0]}


def seconds_at(flops: dict[str, float], rates: dict[str, float]) -> float:
    """The time ``flops`` (by kind) take at the measured ``rates``: the limit."""
    return sum(flops[kind] / rates[kind] for kind in flops)


def add(a: dict[str, float], b: dict[str, float], times: float = 1.0) -> dict[str, float]:
    return {kind: a.get(kind, 0.0) + times * b[kind] for kind in b}


def main(argv: list[str] | None = None) -> int:
    """Print (and with --json write) this machine's product rates on SmolLM2-135M's shapes: the number that tells
    the CPU kinds apart (docs/results.md: ~0.42 TFLOP/s bf16 on the AMD EPYC the time budgets are set on, ~0.95 on
    one with CPU family 26, ~1-2 on a Xeon with AMX)."""
    import argparse
    import json
    import platform

    from dpo4rec.llm import load_base_model

    parser = argparse.ArgumentParser(description="matrix-product rates on the model's layer shapes")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", help="write the rates here")
    args = parser.parse_args(argv)
    model = load_base_model(args.model, torch.float32)
    result = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    print(f"{'dtype':<6} {'layers TFLOP/s':>15} {'LM head TFLOP/s':>16}")
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        rates = measured_rates(model.to(dtype), dtype, row_counts=(512,), seconds=1.0)
        result[name] = {kind: rate / 1e12 for kind, rate in rates.items()}
        print(f"{name:<6} {rates['layers'] / 1e12:>15.2f} {rates['head'] / 1e12:>16.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
