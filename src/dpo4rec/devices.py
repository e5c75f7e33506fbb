"""Which torch device a config field names: "auto" (CUDA when present), "cpu", "cuda", "cuda:1"."""

from __future__ import annotations

import torch

from dpo4rec.errors import InputError


def resolve_device(device: str, field: str) -> torch.device:
    """The device ``field`` asks for, refused in one line when it names CUDA on a machine without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{field}={device} but no CUDA device is available")
    return torch.device(device)
