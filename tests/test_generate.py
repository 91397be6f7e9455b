"""Greedy generation with the KV cache: against decoding without a cache (the whole sequence again
at every step) and against transformers' greedy `generate` (the oracle), token for token.

Tolerances: cached and uncached hidden states of the same tokens agree to 1e-4 (max abs, fp32);
tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

from pizoo.config import RopeConfig
from pizoo.eval.generate import greedy_generate
from pizoo.model import KVCache, load_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4
NEW = 12  # tokens generated per test
ORIGINAL = 64  # the tiny models' context


def _uncached(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the model for every new token."""
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model.forward_logits(torch.tensor([seq]))[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


def _prompts(model, rows: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=gen).tolist()


@pytest.fixture(scope="module")
def variants(tiny_model_factory):
    def get(variant: str, **kwargs):
        name = "gen-" + variant + "".join(f"-{k}{v}" for k, v in kwargs.items() if k != "rope")
        if kwargs.get("rope") is not None:
            name += "-" + kwargs["rope"].type
        return tiny_model_factory(name, variant=variant, tokenizer="bpe", **kwargs)

    return get


@pytest.mark.parametrize("variant,extra", [
    ("llama", {}),
    ("llama-gqa-tied", {}),
    ("qwen2", {}),
    ("mistral", {"sliding_window": 16}),  # the prompt and the generation cross the window
])
def test_cached_generation_equals_decoding_without_cache(variants, variant, extra):
    model = load_model(variants(variant, **extra))
    prompts = _prompts(model, 2, 20, seed=1)
    cached = greedy_generate(model, prompts, NEW)
    assert cached == [_uncached(model, p, NEW) for p in prompts]
    assert all(len(c) == NEW for c in cached)


def test_cached_hidden_states_equal_one_full_pass(variants):
    """The cache's prefill-then-steps computes the same hidden states as one causal pass, also in
    uneven chunks and across a sliding window."""
    model = load_model(variants("mistral", sliding_window=16))
    ids = torch.tensor(_prompts(model, 2, 40, seed=2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(capacity=40)
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 30), (30, 40))]
    assert cache.length == 40
    assert (torch.cat(parts, 1) - full).abs().max().item() <= TOL


@pytest.mark.parametrize("variant,extra", [
    ("llama", {}),
    ("qwen2", {}),
    ("llama", {"rope": RopeConfig(type="yarn", factor=4.0, original_context=ORIGINAL),
               "max_position_embeddings": 4 * ORIGINAL}),
])
def test_greedy_generation_matches_transformers_generate(variants, variant, extra):
    path = variants(variant, **extra)
    ours = load_model(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    length = 100 if "rope" in extra else 24  # the yarn model's prompt is past its original context
    prompts = _prompts(ours, 2, length, seed=3)
    with torch.no_grad():
        hf = theirs.generate(torch.tensor(prompts), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             pad_token_id=0)
    assert greedy_generate(ours, prompts, NEW) == hf[:, length:].tolist()


def test_generation_stops_at_end_of_sequence_and_when_done(variants):
    model = load_model(variants("llama"))
    prompt = _prompts(model, 1, 16, seed=4)
    free = greedy_generate(model, prompt, NEW)[0]
    stop = free[3]
    cut = free.index(stop)
    assert greedy_generate(model, prompt, NEW, stop_ids=[stop])[0] == free[:cut]
    assert greedy_generate(model, prompt, NEW, done=lambda row, toks: len(toks) == 5)[0] == free[:5]


def test_cache_capacity_is_enforced(variants):
    model = load_model(variants("llama"))
    cache = KVCache(capacity=8)
    with torch.no_grad(), pytest.raises(ValueError, match="capacity"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
