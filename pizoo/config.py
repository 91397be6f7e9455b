"""Model and RoPE configuration: one normalised view of a Hugging Face config.json.

pizoo reads both transformers conventions (v4: `rope_scaling` + top-level `rope_theta`; v5: one
`rope_parameters` dict) and writes files that both load: `rope_scaling` and `rope_theta` for v4,
plus an identical `rope_parameters` for v5 (v5 gives `rope_scaling` priority when both are present,
so the two never disagree).

Methods transformers has no name for are written in a form it computes exactly, and recorded in a
`pizoo` block so pizoo can read the method back:
- ntk (static NTK-aware): a changed `rope_theta` (base * s^(d/(d-2))), no `rope_scaling`.
- clex (baked at the target length): `longrope` with short_factor all ones, long_factor = the CLEX
  factors and attention_factor 1.0.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PizooError
from .families import HF_ACTIVATIONS, UNMODELLED, family, family_for_hf, hf_field, supported
from .rope_config import (METHOD_KEYS, ROPE_TYPES, _HF_ROPE_TYPES, RopeConfig, ntk_theta,  # noqa: F401
                          rope_from_dict, rope_to_dict)  # re-exported: pizoo.config is where callers look

# Queries per block when pizoo.model.attend runs blocked (a sliding window past its window,
# soft-capping); the planner's memory model reads it too.
ATTENTION_BLOCK = 512

# Model families that have no rotary position embedding at all.
NON_ROPE_MODEL_TYPES = {
    "gpt2", "bert", "roberta", "distilbert", "t5", "bart", "opt", "bloom", "mpt", "albert",
    "electra", "deberta", "deberta-v2", "xlm-roberta", "gpt_bigcode", "falcon_alibi",
}

@dataclass
class ModelConfig:
    """A model's shape, feature flags and RoPE configuration, normalised from config.json.

    The feature flags are what pizoo.model reads (never a family name); each family
    (pizoo.families) sets them from its own config.json keys."""

    architecture: str  # the family's model_type (pizoo.families.FAMILIES)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama: q,k,v,o biases
    qkv_bias: bool = False  # qwen2: q,k,v biases only
    qk_norm: bool = False  # qwen3: RMSNorm over each head of q and k, before RoPE
    rotary_dim: int | None = None  # dims of each head that RoPE rotates (phi-4-mini: 3/4); None: all
    fused_qkv: bool = False  # phi3: one qkv_proj whose rows are q | k | v
    fused_gate_up: bool = False  # phi3: one gate_up_proj whose rows are gate | up
    sliding_window: int | None = None
    sliding_window_layers: list[int] = field(default_factory=list)
    hidden_act: str = "silu"  # the MLP's activation: silu | gelu_tanh (Gemma) | gelu (GPT-NeoX)
    norm_type: str = "rms"  # rms | layernorm (with bias: GPT-NeoX)
    gated_mlp: bool = True  # down(act(gate x) * up x); False: down(act(up x)) (GPT-NeoX)
    mlp_bias: bool = False  # gpt-neox: biases on the MLP's projections
    parallel_residual: bool = False  # gpt-neox: x + attn(ln1 x) + mlp(ln2 x)
    qkv_per_head: bool = False  # gpt-neox: the fused qkv_proj's rows go per head [q_h | k_h | v_h]
    norm_offset: bool = False  # gemma: RMSNorms scale by (1 + weight)
    sandwich_norms: bool = False  # gemma 2/3: norms on the attention output and around the MLP
    embedding_scale: bool = False  # gemma: embeddings x sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # gemma: attention scale scalar^-0.5 (None: head_dim^-0.5)
    attn_logit_softcap: float | None = None  # gemma 2: attention scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # gemma 2: logits -> cap * tanh(logits / cap)
    local_rope_theta: float | None = None  # gemma 3: sliding-window layers' own RoPE base, never scaled
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # The full original config.json, so keys pizoo does not model survive a round trip.
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    # --- derived facts -------------------------------------------------------------------
    @property
    def original_context(self) -> int:
        """The pre-training context length L (before any scaling)."""
        return self.rope.original_context or self.max_position_embeddings

    @property
    def context_length(self) -> int:
        """The length the model is meant to be used at (the extended length once scaled)."""
        target = (self.raw.get("pizoo") or {}).get("target_context")
        return int(target) if target else self.max_position_embeddings

    @property
    def rope_dim(self) -> int:
        """The dims of each head that RoPE rotates (the frequency count is half of it)."""
        return self.rotary_dim or self.head_dim

    @property
    def family(self):
        """The registered family class (pizoo.families) of this architecture."""
        return family(self.architecture)

    def tensor_table(self):
        """The family's tensor table for this config (pizoo.families.Tensor rows)."""
        return self.family.tensors(self)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, by HF name, with its shape."""
        return {t.hf: t.shape for t in self.tensor_table()}

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.expected_shapes().values())

    def num_non_embedding_params(self) -> int:
        return self.num_params() - self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def layer_window(self, layer: int) -> int | None:
        """The attention window of a layer (None: full causal attention)."""
        return self.sliding_window if layer in self.sliding_window_layers else None

    # --- reading and writing config.json -----------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        return _parse_hf_config(d, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        from .fsutil import read_json

        return _parse_hf_config(read_json(path, "config.json"), str(path))

    def with_rope(self, rope: RopeConfig, context_length: int | None = None) -> "ModelConfig":
        """A copy with new RoPE scaling; `context_length` becomes max_position_embeddings."""
        new = copy.deepcopy(self)
        new.rope = rope
        if context_length is not None:
            new.max_position_embeddings = int(context_length)
        new.raw.setdefault("pizoo", {})
        new.raw["pizoo"]["rope_method"] = rope.method
        if context_length is not None:
            new.raw["pizoo"]["target_context"] = int(context_length)
        return new

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json content that transformers v4 and v5 both load with this exact RoPE."""
        d = copy.deepcopy(self.raw)
        # The RoPE as this family's transformers class reads it (Phi-3: every method as longrope).
        rope = self.family.hf_rope(self.rope, self.rope_dim, self.context_length)
        for legacy in ("rope_scaling", "rope_parameters", "rope_theta"):
            d.pop(legacy, None)
        d.update({
            "architectures": [self.family.hf_class],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": HF_ACTIVATIONS[self.hidden_act],
            "torch_dtype": self.torch_dtype,
            "dtype": self.torch_dtype,
        })
        d.update(self.family.hf_keys(self))
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        theta, scaling = _rope_to_hf(rope, self.rope_dim)
        if rope.type == "dynamic":
            # transformers' dynamic NTK treats max_position_embeddings as the original length L and
            # scales only past it; the usable (target) length is kept in the pizoo block instead.
            d["max_position_embeddings"] = self.rope.original_context
            d.setdefault("pizoo", {})["target_context"] = self.context_length
        if rope.type == "longrope":
            # transformers v4 takes longrope's original length from this top-level key only (without it,
            # L = max_position_embeddings and the long factors are never used below the target); v5 reads
            # it from rope_parameters. Phi-3 writes it the same way.
            d["original_max_position_embeddings"] = self.rope.original_context
        d["rope_theta"] = theta
        d["rope_scaling"] = scaling
        params = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
        if self.rotary_dim:
            d["partial_rotary_factor"] = params["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        d["rope_parameters"] = params
        self.family.hf_rope_layout(self, d)
        pizoo_block = dict(d.get("pizoo") or {})
        if self.rope.method in ("ntk", "clex"):
            pizoo_block["rope_method"] = self.rope.method
            pizoo_block["rope"] = self.rope.describe()
        if pizoo_block:
            d["pizoo"] = pizoo_block
        else:
            d.pop("pizoo", None)
        return d


# --------------------------------------------------------------------------------------------
# Parsing helpers


_get = hf_field


def _parse_hf_config(d: dict[str, Any], source: str) -> ModelConfig:
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type in NON_ROPE_MODEL_TYPES:
        raise PizooError(f"{source}: model_type '{model_type}' has no rotary position embeddings; "
                         f"pizoo extends RoPE models ({supported()})")
    if model_type in UNMODELLED:
        raise PizooError(f"{source}: model_type '{model_type}' has {UNMODELLED[model_type]}, which pizoo does not "
                         f"model; pizoo supports {supported()}")
    fam = family_for_hf(model_type, archs)
    if fam is None:
        what = f"model_type '{model_type}'" if model_type else f"architectures {archs}"
        raise PizooError(f"{source}: unsupported {what}; pizoo supports {supported()}")
    original, d = d, fam.hf_view(d)  # the family's own key names read as the common ones
    hidden = _get(d, "hidden_size", source, int, minimum=1)
    heads = _get(d, "num_attention_heads", source, int, minimum=1)
    kv_heads = _get(d, "num_key_value_heads", source, int, default=heads, minimum=1)
    head_dim = _get(d, "head_dim", source, int, default=None)
    if head_dim is None:
        if hidden % heads:
            raise PizooError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                             "set head_dim explicitly")
        head_dim = hidden // heads
    if heads % kv_heads:
        raise PizooError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise PizooError(f"{source}: head_dim {head_dim} must be even for rotary embeddings")
    if d.get("mlp_bias"):
        raise PizooError(f"{source}: mlp_bias=true is not supported by pizoo's Llama model")
    rope_params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    partial = d.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))
    features = fam.features(original, source, num_layers := _get(d, "num_hidden_layers", source, int, minimum=1))
    if partial not in (None, 1, 1.0) and not fam.partial_rotary:
        raise PizooError(f"{source}: partial_rotary_factor={partial} (partial rotary) is not modelled for "
                         f"{fam.model_type}; pizoo rotates part of each head only for {fam.partial_rotary_families()}")
    rotary_dim = None
    if partial not in (None, 1, 1.0):
        if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial < 1:
            raise PizooError(f"{source}: partial_rotary_factor must be a number in (0, 1], got {partial!r}")
        rotary_dim = int(head_dim * partial)
        if rotary_dim < 2 or rotary_dim % 2:
            raise PizooError(f"{source}: partial_rotary_factor {partial} x head_dim {head_dim} = {rotary_dim} "
                             "rotated dims; it must be even and >= 2")
    max_pos = _get(d, "max_position_embeddings", source, int, minimum=1)
    dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
    cfg = ModelConfig(
        architecture=fam.model_type,
        vocab_size=_get(d, "vocab_size", source, int, minimum=1),
        hidden_size=hidden,
        intermediate_size=_get(d, "intermediate_size", source, int, minimum=1),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope=_parse_rope(d, source, rotary_dim or head_dim, max_pos),
        rms_norm_eps=_get(d, "rms_norm_eps", source, float, default=1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        rotary_dim=rotary_dim,
        hidden_act=fam.activation(original, source),
        **features,
        torch_dtype=str(dtype).removeprefix("torch."),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        raw=copy.deepcopy(original),
    )
    return cfg


def _parse_rope(d: dict[str, Any], source: str, head_dim: int, max_pos: int) -> RopeConfig:
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise PizooError(f"{source}: rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise PizooError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
    # Same priority as transformers v5: a legacy rope_scaling wins over rope_parameters.
    spec: dict[str, Any] = dict(params or {})
    if scaling:
        spec.update(scaling)
    theta = d.get("rope_theta", spec.get("rope_theta", 10000.0))
    if (params and "rope_theta" in params and "rope_theta" in d
            and not math.isclose(float(params["rope_theta"]), float(d["rope_theta"]))):
        raise PizooError(f"{source}: rope_theta ({d['rope_theta']}) and rope_parameters.rope_theta "
                         f"({params['rope_theta']}) disagree; keep one")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise PizooError(f"{source}: rope_theta must be a number, got {theta!r}")
    where = f"{source}: rope_scaling" if scaling else f"{source}: rope_parameters"
    hf_type = spec.get("rope_type", spec.get("type", "default")) if spec else "default"
    if "rope_type" in spec and "type" in spec and spec["rope_type"] != spec["type"]:
        raise PizooError(f"{where}: 'type' ({spec['type']}) and 'rope_type' ({spec['rope_type']}) disagree; keep one")
    pizoo_block = d.get("pizoo") or {}
    if hf_type not in _HF_ROPE_TYPES:
        raise PizooError(f"{where}: rope type '{hf_type}' is not supported; use one of "
                         f"{', '.join(_HF_ROPE_TYPES)}")
    rtype = _HF_ROPE_TYPES[hf_type]
    rope = RopeConfig(type=rtype, theta=float(theta))
    if rtype == "none":
        recorded = pizoo_block.get("rope") or {}
        if pizoo_block.get("rope_method") == "ntk" and recorded:
            # A static NTK model is stored as a changed rope_theta; recover the base and factor.
            rope = RopeConfig(type="ntk", theta=float(recorded["theta"]), factor=float(recorded["factor"]),
                              original_context=int(recorded["original_context"]))
            expected = ntk_theta(rope.theta, rope.factor, head_dim)
            if not math.isclose(expected, float(theta), rel_tol=1e-9):
                raise PizooError(f"{source}: rope_theta {theta} does not match the recorded NTK scaling "
                                 f"(base {rope.theta}, factor {rope.factor} -> {expected}); fix pizoo.rope or rope_theta")
        return rope
    factor = spec.get("factor")
    orig = spec.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))):
        raise PizooError(f"{where}: 'factor' must be a number, got {factor!r}")
    if orig is not None and (isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0):
        raise PizooError(f"{where}: 'original_max_position_embeddings' must be a positive integer, got {orig!r}")
    if rtype in ("linear", "dynamic", "yarn", "llama3") and factor is None:
        if rtype in ("yarn",) and orig:
            factor = max_pos / orig
        else:
            raise PizooError(f"{where}: '{hf_type}' scaling needs 'factor'")
    if rtype == "dynamic":
        # transformers computes dynamic NTK against max_position_embeddings (it is L, not the target).
        orig = max_pos
    if rtype in ("linear",) and orig is None:
        orig = int(round(max_pos / float(factor))) if factor else max_pos
    if orig is None:
        orig = max_pos
    if rtype == "yarn" and factor is not None and orig and max_pos != orig:
        implied = max_pos / orig
        if not math.isclose(implied, float(factor), rel_tol=1e-3) and max_pos > orig:
            # Known pitfall: factor and original_max_position_embeddings disagree. Computation follows
            # `factor` (as transformers and llama.cpp do), so only flag it loudly in inspect.
            pizoo_block = {**pizoo_block, "warning": f"yarn factor {factor} != max_position_embeddings/"
                                                     f"original_max_position_embeddings = {implied:g}"}
    rope = RopeConfig(type=rtype, theta=float(theta), factor=float(factor if factor is not None else 1.0),
                      original_context=int(orig))
    for key in METHOD_KEYS[rtype]:
        if key in spec and spec[key] is not None:
            setattr(rope, key, spec[key])
    if rtype == "longrope":
        for key in ("short_factor", "long_factor"):
            v = spec.get(key)
            if not isinstance(v, list) or len(v) != head_dim // 2:
                raise PizooError(f"{where}: '{key}' must be a list of rotary dims/2 = {head_dim // 2} numbers")
        if factor is None:
            rope.factor = max_pos / rope.original_context
        if pizoo_block.get("rope_method") == "clex":
            rope.method = "clex"
            recorded = pizoo_block.get("rope") or {}
            for key in METHOD_KEYS["clex"]:
                if key in recorded:
                    setattr(rope, key, recorded[key])
    rope.validate(where)
    return rope


def _rope_to_hf(rope: RopeConfig, head_dim: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) in transformers' terms for a pizoo RopeConfig."""
    if rope.type == "none":
        return rope.theta, None
    if rope.type == "ntk":
        return ntk_theta(rope.theta, rope.factor, head_dim), None
    if rope.type == "clex":
        raise PizooError("rope: a CLEX model must be baked into longrope factors before it is written "
                         "(pizoo.clex.bake_clex)")
    s: dict[str, Any] = {"rope_type": rope.type, "type": rope.type, "factor": rope.factor}
    if rope.type in ("yarn", "llama3", "longrope"):
        s["original_max_position_embeddings"] = rope.original_context
    if rope.type == "yarn":
        s.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        for k in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(rope, k) is not None:
                s[k] = getattr(rope, k)
    elif rope.type == "llama3":
        s.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    elif rope.type == "longrope":
        s.update(short_factor=list(rope.short_factor), long_factor=list(rope.long_factor))
        if rope.attention_factor is not None:
            s["attention_factor"] = rope.attention_factor
    return rope.theta, s
