"""Random-init tiny decoders for the tests that check two computations of the same numbers agree."""


def tiny_causal_lm(kind: str, layers: int = 4, seed: int = 0):
    """A random-init decoder of SmolLM2's vocabulary (the real tokenizer's ids fit) in fp32, built here in a blink:
    for tests of equality between two ways of computing the same thing, where trained weights add nothing.
    ``kind``: "llama" (SmolLM2's architecture) or "qwen2" (biases on q, k and v). Weights drawn wider than a real
    init (std 0.2) so logits have clear winners, as a trained model's do."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.2,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    torch.manual_seed(seed)
    model = model_class(config(**shape, **({"use_sliding_window": False} if kind == "qwen2" else {})))
    if kind == "qwen2":  # random q/k/v biases: a zero bias would not show whether they are applied
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.data.normal_(0, 0.2)
    return model.float().eval()
