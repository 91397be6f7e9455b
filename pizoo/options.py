"""Checks of option values at the boundary where they are read, each failing with one line that
names the option and the fix (rather than a traceback deep inside torch, struct.pack or a format
writer)."""

from __future__ import annotations

import re
from typing import Iterable

from .errors import PizooError

# The largest context any output format can store: GGUF's context_length is a uint32 and
# TensorRT-LLM's max_position_embeddings an int32; position ids are int32 in both runtimes.
MAX_CONTEXT = 2**31 - 1
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_context(value: int, option: str = "--ctx") -> int:
    """A context length in tokens: a positive integer no format overflows."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PizooError(f"{option} {value}: must be a positive number of tokens (e.g. 32768)")
    if value > MAX_CONTEXT:
        raise PizooError(f"{option} {value}: above {MAX_CONTEXT}, the largest context GGUF (uint32) and "
                         "TensorRT-LLM (int32) can store; give a smaller context")
    return value


def check_device(device: str | None, option: str = "--device") -> str | None:
    """cpu, cuda or cuda:N, and cuda only where CUDA is available (None: pick automatically)."""
    if device is None:
        return None
    text = str(device).strip().lower()
    if not _DEVICE.match(text):
        raise PizooError(f"{option} {device}: unknown device; use cpu or cuda (cuda:N for one GPU)")
    if text.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PizooError(f"{option} {device}: CUDA is not available on this machine (no GPU or a CPU-only "
                             "torch build); use --device cpu")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise PizooError(f"{option} {device}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return text


def parse_contexts(text: str | int | Iterable[int] | None, option: str = "--ctx") -> list[int] | None:
    """'2048,4096,8k' / 8192 / [2048, 4096] -> sorted unique ints (None stays None). `option` is the
    command-line option the text came from, named in the errors."""
    if text is None:
        return None
    if isinstance(text, int):
        items: list = [text]
    elif isinstance(text, str):
        items = [s.strip() for s in text.split(",") if s.strip()]
    else:
        items = list(text)
    out = []
    for s in items:
        try:
            v = int(s) if not isinstance(s, str) else (int(s[:-1]) * 1024 if s.lower().endswith("k") else int(s))
        except ValueError:
            raise PizooError(f"{option}: '{s}' is not a number; give lengths like 2048,4096,8k") from None
        if v < 2:
            raise PizooError(f"{option}: {v} is too short; a window needs at least 2 tokens")
        out.append(check_context(v, option))
    if not out:
        raise PizooError(f"{option}: no context lengths given; e.g. {option} 2048,4096,8192")
    return sorted(set(out))
