"""CLEX: continuous length extrapolation with a learned ODE over RoPE frequencies (arXiv 2310.16450).

The state is z(t) = log inv_freq (d/2 values) as a function of the scale t >= 1 (t = 1: the
pre-trained frequencies). CLEX evolves it with

    dz/dt = W_down act(W_up (z + log theta_ntk(t))) + d/dt log theta_ntk(t)

where theta_ntk(t) are NTK-aware frequencies with alpha = 2t - 1. pizoo integrates the equivalent
form z = log theta_ntk(t) + y, dy/dt = W_down act(W_up (y + 2 log theta_ntk(t))), y(1) = 0: the
NTK part is then exact (closed form) rather than RK4-approximated, so with W_down zero-initialised
training starts *exactly* at NTK-aware scaling, and only the learned correction is integrated.

Numerics (users report NaN gradients and slow training with the reference implementation): the
ODE always runs in float32 with autocast disabled, on log-frequencies (bounded, no exp inside the
integration), with a fixed number of RK4 steps per integer t; eval-mode results are cached per t.
At inference t = ceil(seq_len / L), capped at max_factor: one frequency table per integer t.

For export the module is baked at the target length into fixed per-frequency factors and written
as `longrope` (short_factor ones, long_factor = base_inv / clex_inv, attention_factor 1.0), which
transformers, llama.cpp (rope_freqs) and TensorRT-LLM load without custom code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import RopeConfig
from .errors import PizooError
from .rope import base_inv_freq

ACTIVATIONS = {"silu": nn.functional.silu, "tanh": torch.tanh}


class ClexFrequencies(nn.Module):
    """The learnable frequency module; plug it in with `RotaryEmbedding.set_frequency_module`."""

    def __init__(self, theta: float, dim: int, original_context: int, *, max_factor: float = 16.0,
                 param_factor: int = 1, act: str = "silu", time_dt: float = 0.01):
        super().__init__()
        if act not in ACTIVATIONS:
            raise PizooError(f"clex: act '{act}' is not supported; use silu or tanh")
        if not time_dt > 0:
            raise PizooError(f"clex: time_dt must be > 0, got {time_dt}")
        if dim % 2 or dim < 4:
            raise PizooError(f"clex: rotary dim {dim} must be even and >= 4")
        self.theta, self.dim, self.original_context = float(theta), int(dim), int(original_context)
        self.max_factor, self.param_factor, self.act_name, self.time_dt = float(max_factor), int(param_factor), act, float(time_dt)
        half = dim // 2
        self.w_up = nn.Linear(half, param_factor * dim, bias=False)
        self.w_down = nn.Linear(param_factor * dim, half, bias=False)
        self.reset_parameters()
        self._cache: dict[int, torch.Tensor] = {}

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_up.weight, std=1.0 / math.sqrt(self.dim // 2))
        nn.init.zeros_(self.w_down.weight)  # start exactly at NTK-aware scaling

    @property
    def max_scale(self) -> int:
        return max(1, int(math.floor(self.max_factor)))

    def scale_for(self, seq_len: int) -> int:
        """t = ceil(seq_len / L), at least 1, capped at max_factor."""
        return min(max(1, math.ceil(seq_len / self.original_context)), self.max_scale)

    def log_ntk(self, t: float | torch.Tensor) -> torch.Tensor:
        """log inverse frequencies of NTK-aware scaling with alpha = 2t - 1, in float64 on the CPU.

        `t` may be a 1-D tensor of scales (one row per scale). Computed in closed form, never
        integrated; created on the CPU explicitly so a meta-device model build does not touch it.
        """
        d = self.dim
        exponent = torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d
        t = torch.as_tensor(t, dtype=torch.float64, device="cpu")
        log_base = math.log(self.theta) + d / (d - 2) * torch.log(2 * t - 1)
        return -log_base[..., None] * exponent

    def _correction_rate(self, ntk_term: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Weights are cast to float32 explicitly: under FSDP mixed precision they arrive in bf16.
        act = ACTIVATIONS[self.act_name]
        hidden = act(nn.functional.linear(y + ntk_term, self.w_up.weight.float()))
        return nn.functional.linear(hidden, self.w_down.weight.float())

    def correction(self, t: int) -> torch.Tensor:
        """y(t): the learned correction to log NTK frequencies, RK4 from 1 to t (float32)."""
        dev = self.w_up.weight.device
        y = torch.zeros(self.dim // 2, dtype=torch.float32, device=dev)
        if t <= 1:
            return y
        n = max(1, round((t - 1) / self.time_dt))
        h = (t - 1) / n
        # 2 log theta_ntk at every half step 1, 1 + h/2, ..., t: one table, one host-to-device copy.
        grid = 1 + (h / 2) * torch.arange(2 * n + 1, dtype=torch.float64)
        ntk = (2 * self.log_ntk(grid)).float().to(dev)
        with torch.autocast(device_type=dev.type, enabled=False):
            f = self._correction_rate
            for k in range(n):
                k1 = f(ntk[2 * k], y)
                k2 = f(ntk[2 * k + 1], y + h / 2 * k1)
                k3 = f(ntk[2 * k + 1], y + h / 2 * k2)
                k4 = f(ntk[2 * k + 2], y + h * k3)
                y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y

    def log_inv_freq(self, t: int) -> torch.Tensor:
        return self.log_ntk(t).float().to(self.w_up.weight.device) + self.correction(t)

    def inv_freq_at_scale(self, t: int) -> torch.Tensor:
        """Inverse frequencies for integer scale t (differentiable in training mode)."""
        if self.training and torch.is_grad_enabled():
            self._cache.clear()
            return torch.exp(self.log_inv_freq(t))
        hit = self._cache.get(t)
        if hit is None:
            with torch.no_grad():
                hit = torch.exp(self.log_inv_freq(t))
            self._cache[t] = hit
        return hit

    def forward(self, seq_len: int) -> torch.Tensor:
        return self.inv_freq_at_scale(self.scale_for(seq_len))

    def train(self, mode: bool = True) -> "ClexFrequencies":
        self._cache.clear()  # parameters may change once training resumes
        return super().train(mode)


def clex_module_for(rope: RopeConfig, dim: int) -> ClexFrequencies:
    """A fresh CLEX module for a `clex` RopeConfig (recipe parameters, base theta, original L)."""
    if rope.method != "clex":
        raise PizooError(f"rope: expected a clex RopeConfig, got '{rope.method}'")
    return ClexFrequencies(rope.theta, dim, rope.original_context, max_factor=rope.max_factor,
                           param_factor=rope.param_factor, act=rope.act, time_dt=rope.time_dt)


def bake_clex(module: ClexFrequencies, rope: RopeConfig, target_context: int) -> RopeConfig:
    """Fixed longrope factors reproducing the module's frequencies at `target_context`.

    long_factor_i = base_inv_i / clex_inv_i (so longrope's 1/(ext_i * base^(2i/d)) gives clex_inv),
    short_factor all ones (t = 1 is the base model), attention_factor 1.0 (CLEX keeps logits).
    """
    with torch.no_grad():
        inv = module.inv_freq_at_scale(module.scale_for(target_context)).detach().float().cpu()
    base = base_inv_freq(module.theta, module.dim)
    long_factor = (base / inv).tolist()
    if not all(math.isfinite(x) and x > 0 for x in long_factor):
        raise PizooError("clex: the learned frequencies are not finite and positive; the run diverged "
                         "(lower the learning rate)")
    baked = RopeConfig(type="longrope", theta=module.theta, factor=float(target_context) / module.original_context,
                       original_context=module.original_context, method="clex", attention_factor=1.0,
                       short_factor=[1.0] * (module.dim // 2), long_factor=long_factor,
                       max_factor=module.max_factor, param_factor=module.param_factor, act=module.act_name,
                       time_dt=module.time_dt)
    baked.validate("clex")
    return baked
