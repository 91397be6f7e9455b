"""Device, dtype and batching shared by the measurements: equal-length items batched, the batch
halved on a GPU out-of-memory error.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import PizooError

CPU_BATCH_TOKENS = 16384


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PizooError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU (SDPA's flash kernel), fp32 on CPU, unless told otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from ..checkpoint import parse_dtype

    return parse_dtype(dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def auto_batch_size(model, length: int, batch_tokens: int | None = None) -> int:
    """Windows per forward pass: a token budget on CPU, a share of free memory on GPU."""
    if batch_tokens:
        return max(1, batch_tokens // length)
    device = model_device(model)
    if device.type != "cuda":
        return max(1, CPU_BATCH_TOKENS // length)
    cfg = model.config
    elt = next(model.parameters()).element_size()
    # Live activations per token inside one layer (no grad): residual + normed input, q/k/v/out,
    # the MLP's gate/up/act; x2 for allocator slack. The head is applied in chunks (constant).
    width = 3 * cfg.hidden_size + 2 * cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim \
        + 3 * cfg.intermediate_size
    per_window = 2 * elt * width * length
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(64, (free * 0.6) // per_window)))


def _is_oom(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg or "can't allocate memory" in msg


def run_batches(items: list, length_of: Callable[[Any], int], batch_size: Callable[[int], int],
                 run: Callable[[list], None], where: str) -> None:
    """Run `run` on batches of equal-length items; halve the batch on a GPU out-of-memory error."""
    by_len: dict[int, list] = {}
    for it in items:
        by_len.setdefault(length_of(it), []).append(it)
    for length, group in sorted(by_len.items(), reverse=True):
        size = batch_size(length)
        i = 0
        while i < len(group):
            batch = group[i:i + size]
            try:
                run(batch)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_oom(e):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if size == 1:
                    raise PizooError(f"{where}: one window of {length} tokens does not fit in memory; "
                                     "use a smaller --ctx or a device with more memory") from None
                size = max(1, size // 2)
                continue
            i += len(batch)
