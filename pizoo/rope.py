"""The RoPE library: inverse frequencies and attention factor for every scaling method.

One place computes how positions are rotated; training, evaluation and every exporter call it. Each
method is a small function `(rope, dim, seq_len) -> (inv_freq[dim/2] float32, attention_factor)`,
registered in `METHODS`. Notation follows shared/REFERENCE.md section 1: d = rotary dim,
inv_freq_i = base^(-2i/d), s = factor, L = original context.

Computation mirrors the float32 arithmetic transformers uses, so logits agree to ~1e-6.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import nn

from .rope_config import RopeConfig, ntk_theta

InvFreqFn = Callable[[RopeConfig, int, int], tuple[torch.Tensor, float]]
METHODS: dict[str, InvFreqFn] = {}


def method(name: str) -> Callable[[InvFreqFn], InvFreqFn]:
    def register(fn: InvFreqFn) -> InvFreqFn:
        METHODS[name] = fn
        return fn

    return register


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/d), i = 0..d/2-1 (Su et al., RoFormer, arXiv 2104.09864)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


@method("none")
def rope_none(rope: RopeConfig, dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    return base_inv_freq(rope.theta, dim), 1.0


@method("linear")
def rope_linear(rope: RopeConfig, dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """Position Interpolation (Chen et al., arXiv 2306.15595): positions m -> m/s, i.e. inv_freq / s."""
    return base_inv_freq(rope.theta, dim) / rope.factor, 1.0


@method("ntk")
def rope_ntk(rope: RopeConfig, dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """Static NTK-aware scaling (bloc97, 2023): base' = base * s^(d/(d-2)); high frequencies kept."""
    return base_inv_freq(ntk_theta(rope.theta, rope.factor, dim), dim), 1.0


@method("dynamic")
def rope_dynamic(rope: RopeConfig, dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """Dynamic NTK (emozilla, 2023): base' = base*((s*n/L) - (s-1))^(d/(d-2)), n = max(seq_len, L).

    Recomputed per forward from the longest position in the batch; stateless, so no cached key can
    go stale.
    """
    L = rope.original_context
    n = max(seq_len, L)
    base = rope.theta * ((rope.factor * n / L) - (rope.factor - 1)) ** (dim / (dim - 2))
    return base_inv_freq(base, dim), 1.0


def yarn_attention_factor(rope: RopeConfig) -> float:
    """YaRN's temperature: 0.1*ln(s)+1, or the mscale/mscale_all_dim ratio when both are given."""
    if rope.attention_factor is not None:
        return float(rope.attention_factor)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return get_mscale(rope.factor, rope.mscale) / get_mscale(rope.factor, rope.mscale_all_dim)
    return get_mscale(rope.factor)


@method("yarn")
def rope_yarn(rope: RopeConfig, dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al., arXiv 2309.00071): NTK-by-parts ramp between interpolated and original
    frequencies, plus an attention temperature."""
    L, s, base = rope.original_context, rope.factor, rope.theta

    def corr_dim(rotations: float) -> float:
        return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(rope.beta_fast), corr_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv = interpolation * (1 - keep) + extrapolation * keep
    return inv, yarn_attention_factor(rope)


@method("llama3")
def rope_llama3(rope: RopeConfig, dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """Llama 3.1 scaling (Meta, 2024): long wavelengths divided by s, short kept, smooth in between."""
    inv = base_inv_freq(rope.theta, dim)
    L, s, lo, hi = rope.original_context, rope.factor, rope.low_freq_factor, rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > L / lo, inv / s, inv)
    smooth = (L / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / s + smooth * scaled
    medium = ~(wavelen < L / hi) * ~(wavelen > L / lo)
    return torch.where(medium, smoothed, scaled), 1.0


def longrope_attention_factor(rope: RopeConfig) -> float:
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_context))


@method("longrope")
def rope_longrope(rope: RopeConfig, dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Ding et al., arXiv 2402.13753) with given factors: inv_i = 1/(ext_i * base^(2i/d)),
    ext = long_factor past L, else short_factor. Baked CLEX uses this form too."""
    ext = rope.long_factor if seq_len > rope.original_context else rope.short_factor
    ext_t = torch.tensor(ext, dtype=torch.float32)
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_t * rope.theta ** shape), longrope_attention_factor(rope)


def inv_freq_for(rope: RopeConfig, dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention factor of `rope` for a forward over `seq_len` positions."""
    if rope.type not in METHODS:
        raise KeyError(f"no RoPE method '{rope.type}' (a learned method needs its frequency module)")
    return METHODS[rope.type](rope, dim, seq_len)


def frequency_factors(rope: RopeConfig, dim: int, seq_len: int) -> torch.Tensor:
    """Per-frequency divisors base_inv / scaled_inv (llama.cpp's rope_freqs semantics: value > 1
    lowers that frequency). Any static per-frequency scaling can be written this way."""
    inv, _ = inv_freq_for(rope, dim, seq_len)
    return base_inv_freq(rope.theta, dim) / inv


class FrequencyModule(Protocol):
    """A learned source of inverse frequencies (CLEX plugs in here, see pizoo.clex)."""

    def forward(self, seq_len: int) -> torch.Tensor: ...


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for given position ids; every method plugs in through `inv_freq_for`.

    A learned method (CLEX) is attached with `set_frequency_module`; it then produces the inverse
    frequencies (differentiably) for each forward's sequence length.
    """

    def __init__(self, rope: RopeConfig, dim: int):
        super().__init__()
        self.rope, self.dim = rope, dim
        self.learned: nn.Module | None = None
        self._cache: dict[int, tuple[torch.Tensor, float]] = {}

    def set_frequency_module(self, module: nn.Module | None) -> None:
        self.learned = module
        self._cache.clear()

    def inv_freq(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, float]:
        if self.learned is not None:
            return self.learned(seq_len).to(device=device, dtype=torch.float32), 1.0
        # Static methods depend on seq_len only through a threshold (longrope) or not at all, so
        # one table per method suffices; dynamic NTK needs one per length.
        if self.rope.type == "dynamic":
            key = max(seq_len, self.rope.original_context)
        elif self.rope.type == "longrope":
            key = int(seq_len > self.rope.original_context)
        else:
            key = 0
        hit = self._cache.get(key)
        if hit is None or hit[0].device != device:
            inv, attn = inv_freq_for(self.rope, self.dim, seq_len)
            hit = (inv.to(device), attn)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, dim] in `dtype` (attention factor applied)."""
        seq_len = int(position_ids.max()) + 1
        inv, attn = self.inv_freq(seq_len, position_ids.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv[None, None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * attn, emb.sin() * attn
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q, k [B, H, T, D] by cos/sin [B, T, R] (HF 'half' layout: pairs (i, i + R/2)). With
    partial rotary (R < D) only the first R dims of each head rotate; the rest pass through."""
    cos, sin = cos[:, None], sin[:, None]
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q_rot, k_rot = q[..., :r], k[..., :r]
    return (torch.cat((q_rot * cos + rotate_half(q_rot) * sin, q[..., r:]), dim=-1),
            torch.cat((k_rot * cos + rotate_half(k_rot) * sin, k[..., r:]), dim=-1))
