"""pizoo's model vs transformers (the oracle): every registered family's tiny variants
(pizoo.families) x every RoPE type transformers supports, below the original context and at 3x it. Tolerance: max abs logit difference <= 1e-4 (fp32)."""

from __future__ import annotations

import pytest
import torch

from pizoo.config import RopeConfig
from pizoo.model import load_model
from pizoo.synthetic import VARIANTS

transformers = pytest.importorskip("transformers")

ORIGINAL = 64  # tiny models' original context
TOL = 1e-4
HALF = 8  # head_dim 16 -> 8 frequencies

ROPES = {
    "default": None,
    "linear": RopeConfig(type="linear", factor=4.0, original_context=ORIGINAL),
    "dynamic": RopeConfig(type="dynamic", factor=4.0, original_context=ORIGINAL),
    "yarn": RopeConfig(type="yarn", factor=4.0, original_context=ORIGINAL),
    "yarn-mscale": RopeConfig(type="yarn", factor=4.0, original_context=ORIGINAL, beta_fast=16.0, beta_slow=2.0,
                              mscale=0.707, mscale_all_dim=1.0),
    "llama3": RopeConfig(type="llama3", factor=4.0, original_context=ORIGINAL, low_freq_factor=1.0,
                         high_freq_factor=4.0),
    "longrope": RopeConfig(type="longrope", factor=4.0, original_context=ORIGINAL,
                           short_factor=[1.0 + 0.05 * i for i in range(HALF)],
                           long_factor=[1.0 + 0.5 * i for i in range(HALF)]),
    "ntk": RopeConfig(type="ntk", factor=4.0, original_context=ORIGINAL),
}


@pytest.fixture(scope="module")
def models(tiny_model_factory):
    def get(variant: str, rope_name: str):
        rope = ROPES[rope_name]
        v = VARIANTS[variant]
        half = (v.get("rotary_dim") or v.get("head_dim", 2 * HALF)) // 2  # partial rotary: fewer frequencies
        if rope is not None and rope.type == "longrope" and half != HALF:  # one factor per frequency
            rope = RopeConfig(type="longrope", factor=4.0, original_context=ORIGINAL,
                              short_factor=[1.0 + 0.05 * i for i in range(half)],
                              long_factor=[1.0 + 0.5 * i for i in range(half)])
        extra = {} if rope is None else {"max_position_embeddings": 4 * ORIGINAL}
        tok = "sentencepiece" if variant == "llama" else "bpe"
        return tiny_model_factory(f"parity-{variant}-{rope_name}", variant=variant, tokenizer=tok, rope=rope, **extra)

    return get


def max_diffs_vs_transformers(folder, lengths, batch: int):
    """pizoo's config and, per length, the max abs logit difference between pizoo and transformers
    (fp32; SDPA, or transformers' eager attention for a family whose class has no SDPA path, Gemma 2)
    on seeded random ids of `batch` sequences."""
    ours = load_model(folder)
    try:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                   attn_implementation="sdpa").eval()
    except ValueError:  # "... does not support an attention implementation through ... sdpa"
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(1)
    diffs = {}
    for length in lengths:
        ids = torch.randint(0, ours.config.vocab_size, (batch, length), generator=gen)
        with torch.no_grad():
            diffs[length] = (ours.forward_logits(ids) - theirs(ids).logits).abs().max().item()
    return ours.config, diffs


@pytest.mark.parametrize("variant", list(VARIANTS))  # every registered family's tiny variants
@pytest.mark.parametrize("rope_name", list(ROPES))
def test_logits_match_transformers(models, variant, rope_name):
    _, diffs = max_diffs_vs_transformers(models(variant, rope_name), (ORIGINAL // 2, 3 * ORIGINAL), batch=2)
    for length, diff in diffs.items():
        assert diff <= TOL, f"{variant}/{rope_name} at {length} tokens: max abs diff {diff}"


def test_scaling_changes_logits_past_original(models):
    """Guard against a parity test that passes because scaling is silently ignored on both sides."""
    for variant in ("llama", "phi3"):  # phi3: partial rotary, every method written as longrope
        base = load_model(models(variant, "default"))
        ids = torch.randint(0, base.config.vocab_size, (1, 3 * ORIGINAL), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref = base.forward_logits(ids)
            for name in ("linear", "yarn", "llama3", "ntk", "longrope", "dynamic"):
                scaled = load_model(models(variant, name))
                assert (scaled.forward_logits(ids) - ref).abs().max().item() > 1e-5, (variant, name)


def test_mistral_sliding_window_matches_transformers(tiny_model_factory):
    path = tiny_model_factory("parity-mistral-window", variant="mistral", tokenizer="bpe", sliding_window=16)
    ours = load_model(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ours.forward_logits(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= TOL
    assert ours.config.sliding_window == 16


def test_dynamic_ntk_is_stateless():
    """Dynamic NTK depends only on the current sequence length: a long call then a short call gives
    the short call's own frequencies (transformers keeps the long table until it resets)."""
    from pizoo.rope import RotaryEmbedding

    rope = RopeConfig(type="dynamic", factor=4.0, original_context=ORIGINAL)
    rot = RotaryEmbedding(rope, 16)
    short = torch.arange(100)[None]
    first = rot(short, torch.float32)
    rot(torch.arange(250)[None], torch.float32)
    again = rot(short, torch.float32)
    assert torch.equal(first[0], again[0])
