"""The sampler's CPU kernels for CPUs with AVX512-BF16, compiled from C++ on first use.

* prefix_attention.cpp: the decode step's attention over each user's shared
  prompt. On a 2-core AMD EPYC without AMX, PyTorch's fused CPU attention ran
  the prompt part of a decode step at ~75-125 GFLOP/s, a third of the step,
  while the matrix products ran at ~350; a user's problem of 3-33 queries by
  64 dims is too small for its general tiling. This kernel keeps 8 queries x
  32 prompt keys of accumulators in registers, sums bf16 x bf16 pair products
  in fp32 (vdpbf16ps), adds each row's own suffix keys (fp32) to the same
  fp32 softmax, and multiplies the prompt's probabilities, rounded to bf16 as
  the model's own attention rounds them, by its values in vdpbf16ps again:
  one call per layer and step. With one length per query it also runs the
  prompts' own causal attention in the prefill.
* fused_ops.cpp: the decoder layer's elementwise work (RMSNorm with the
  residual add before it, rotary embedding, SiLU x up) in one pass each,
  with the model's bf16 roundings. PyTorch runs each as 3-14 operations; in a
  decode step of 160 rows that dispatch cost ~15% of the step. Also top-p
  sampling's two passes over the vocabulary (sampler.py), row by row.

Measured in benchmarks/decode_step.py (``kernel``, ``fused_ops``) and
docs/generation.md. Compiled once per machine by ``torch.utils.cpp_extension``
(~40 s on 2 cores, cached under ``TORCH_EXTENSIONS_DIR``, default
~/.cache/torch_extensions). Where it cannot be used (no AVX512-BF16, no C++
compiler or ninja, GPUs; for the attention also a head size other than 64)
the sampler keeps PyTorch's operations, so nothing depends on it;
``DPO4REC_CPU_KERNELS=0`` turns it off.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HEAD_DIM = 64  # the attention kernel's head size
KEY_BLOCK = 32  # keys per block: prompt caches are padded to a multiple of this
_SOURCES = [Path(__file__).with_name(name) for name in ("cpu_kernels.cpp", "prefix_attention.cpp", "fused_ops.cpp")]
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp",
          "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]  # ATen's 512-bit vectors (its exp) in the kernel
_loaded: list = []  # [module or None] once tried


def layout(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches (..., P, d) as the attention kernel reads them, in the pairs vdpbf16ps multiplies: keys (..., d/2, P', 2),
    each key's dims in pairs, and values (..., P'/2, d, 2), each dim's values of two consecutive keys side by side;
    both padded with zeros to P', P rounded up to a whole key block."""
    *lead, P, d = keys.shape
    width = -(-P // KEY_BLOCK) * KEY_BLOCK
    key_pairs = F.pad(keys, (0, 0, 0, width - P)).view(*lead, width, d // 2, 2).transpose(-3, -2).contiguous()
    value_pairs = F.pad(values, (0, 0, 0, width - P)).view(*lead, width // 2, 2, d).transpose(-2, -1).contiguous()
    return key_pairs, value_pairs


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU runs vdpbf16ps (Linux: /proc/cpuinfo; elsewhere assumed not)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx512f", "avx512bw", "avx512_bf16"} <= set(flags.split(":", 1)[1].split())


def compiled():
    """The compiled module (``attention`` and the fused operations), or None where it cannot run here (decided once
    per process)."""
    if not _loaded:
        _loaded.append(_build())
    return _loaded[0]


def _build():
    if os.environ.get("DPO4REC_CPU_KERNELS", "1") == "0" or not cpu_has_avx512_bf16():
        return None
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the pip package's ninja, when its environment's bin is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return load(name="dpo4rec_cpu_kernels", sources=[str(p) for p in _SOURCES], extra_cflags=_FLAGS,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, an old compiler without -mavx512bf16: PyTorch's operations instead
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        warnings.warn(f"the CPU kernels could not be built ({message}); using PyTorch's operations instead "
                      "(slower; the same results to bf16 rounding)", stacklevel=3)
        return None
