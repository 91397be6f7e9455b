"""Greedy decoding with a KV cache: the prompt in one forward pass, then one token per step.

The tasks (and passkey's "generate" mode) read what the model writes, as RULER does. Prompts in
one call have the same length (callers batch equal-length prompts), so no padding or attention
mask is needed and every row's positions are the same. A row stops at an end-of-sequence token or
when `done(row, tokens)` says so; the batch stops when every row has.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import PizooError
from .batching import model_device


@torch.inference_mode()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    stop_ids: Sequence[int] = (),
                    done: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """The greedy continuation of each prompt (at most max_new_tokens tokens, the stop token excluded)."""
    from ..model import KVCache

    if not prompts:
        return []
    if len({len(p) for p in prompts}) != 1:
        raise PizooError("greedy_generate: the prompts of one batch must have the same length")
    if max_new_tokens < 1:
        raise PizooError(f"greedy_generate: max_new_tokens {max_new_tokens}: must be at least 1")
    device = model_device(model)
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
    cache = KVCache(capacity=ids.shape[1] + max_new_tokens)
    out: list[list[int]] = [[] for _ in prompts]
    running = [True] * len(prompts)
    stops = set(stop_ids)
    hidden = model(ids, cache=cache)[:, -1]
    for step in range(max_new_tokens):
        next_ids = model.logits(hidden).float().argmax(-1)
        for row, token in enumerate(next_ids.tolist()):
            if not running[row]:
                continue
            if token in stops:
                running[row] = False
                continue
            out[row].append(token)
            if done is not None and done(row, out[row]):
                running[row] = False
        if not any(running) or step == max_new_tokens - 1:
            break
        hidden = model(next_ids[:, None], cache=cache)[:, -1]
    return out
