"""RoPE configuration as data: the methods pizoo computes, their parameters and how they check.

Kept apart from pizoo.config (which reads and writes config.json and knows the model families) so
that the RoPE math (pizoo.rope) and the families can both read it without importing each other.
pizoo.config re-exports every name here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import PizooError

# The RoPE methods pizoo computes. `ntk` and `clex` have no transformers rope_type of their own.
ROPE_TYPES = ("none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "clex")
# transformers rope_type -> pizoo type
_HF_ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
                  "llama3": "llama3", "longrope": "longrope"}

# Keys that belong to each method in rope_scaling, besides rope_type/type/factor.
METHOD_KEYS = {
    "none": (),
    "linear": (),
    "ntk": (),
    "dynamic": (),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor", "attention_factor"),
    "clex": ("max_factor", "param_factor", "act", "time_dt"),
}


@dataclass
class RopeConfig:
    """How positions are rotated: the method, the base, and the method's own parameters.

    `type` is what is computed; `method` is what the user asked for (they differ only for CLEX once
    baked, which computes as `longrope`). `original_context` is the pre-training length L.
    """

    type: str = "none"
    theta: float = 10000.0
    factor: float = 1.0
    original_context: int | None = None
    method: str | None = None
    attention_factor: float | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # longrope (and baked clex)
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None
    # clex (learned ODE; see pizoo.clex)
    max_factor: float = 16.0
    param_factor: int = 1
    act: str = "silu"
    time_dt: float = 0.01

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = self.type

    @property
    def is_scaled(self) -> bool:
        return self.type != "none"

    def params(self) -> dict[str, Any]:
        """The method's own parameters (for inspect, cards and exports)."""
        keys = METHOD_KEYS[self.method if self.method in METHOD_KEYS else self.type]
        if self.method == "clex" and self.type == "longrope":
            keys = keys + ("long_factor",)
        out = {}
        for k in keys:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    def describe(self) -> dict[str, Any]:
        """Stable JSON description: type, factor, theta, original_context and the method's keys."""
        d = {"type": self.method, "factor": self.factor, "theta": self.theta,
             "original_context": self.original_context}
        if self.method != self.type:
            d["computed_as"] = self.type
        d.update(self.params())
        return d

    def scaled(self, method: str, factor: float, original_context: int, **params) -> "RopeConfig":
        """A copy with a scaling method applied on top of this (unscaled) base."""
        if self.is_scaled:
            raise PizooError(
                f"rope: model already uses '{self.method}' scaling (factor {self.factor}); "
                "extend an unscaled base checkpoint instead")
        new = RopeConfig(type=method, theta=self.theta, factor=float(factor),
                         original_context=int(original_context), method=method)
        for k, v in params.items():
            if not hasattr(new, k):
                raise PizooError(f"rope: unknown parameter '{k}' for method '{method}'")
            setattr(new, k, v)
        new.validate("rope")
        return new

    def validate(self, where: str) -> None:
        if self.type not in ROPE_TYPES:
            raise PizooError(f"{where}: unknown RoPE type '{self.type}'; use one of {', '.join(ROPE_TYPES)}")
        if not (self.theta > 0 and math.isfinite(self.theta)):
            raise PizooError(f"{where}: rope_theta must be a positive number, got {self.theta}")
        if self.type != "none":
            if not (self.factor >= 1.0 and math.isfinite(self.factor)) and self.type != "longrope":
                raise PizooError(f"{where}: rope factor must be >= 1, got {self.factor}")
            if self.original_context is None or self.original_context <= 0:
                raise PizooError(f"{where}: '{self.type}' scaling needs original_max_position_embeddings")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise PizooError(f"{where}: llama3 high_freq_factor ({self.high_freq_factor}) must exceed "
                             f"low_freq_factor ({self.low_freq_factor})")
        if self.type == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise PizooError(f"{where}: longrope needs both short_factor and long_factor")
        if self.type == "yarn" and not self.beta_fast > self.beta_slow:
            raise PizooError(f"{where}: yarn beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow})")


def ntk_theta(theta: float, factor: float, dim: int) -> float:
    """Static NTK-aware base: base * s^(d/(d-2)) (bloc97, 2023)."""
    return theta * factor ** (dim / (dim - 2))


def rope_from_dict(d: dict[str, Any], where: str) -> RopeConfig:
    """Build a RopeConfig from a plain dict (recipes, CLI); unknown keys are an error naming the key."""
    known = {f for f in RopeConfig.__dataclass_fields__}
    for k in d:
        if k not in known:
            raise PizooError(f"{where}: unknown RoPE key '{k}'")
    rope = RopeConfig(**d)
    rope.validate(where)
    return rope


def rope_to_dict(rope: RopeConfig) -> dict[str, Any]:
    return asdict(rope)
