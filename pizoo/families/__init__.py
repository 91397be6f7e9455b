"""The family registry: what a model family is, stated once per family.

A family is one module here with one `Family` subclass, registered with `@register` under the HF
`architectures` class and `model_type` it handles (llama.cpp's convert_hf_to_gguf.py
`ModelBase.register` is the model). A variant subclasses its parent and overrides what differs.
The class says, in one place:

- `features(d, source, num_layers)`: the `ModelConfig` feature flags read from config.json (biases,
  q/k norm, sliding-window layers); `hf_keys(cfg)`: the family's own keys written back.
  `pizoo.model` reads the flags and never a family name;
- `tensors(cfg)`: the one tensor table (HF name and shape, GGUF name, TensorRT-LLM name and its
  tensor-parallel split) that the config check, the GGUF export and import, the TensorRT-LLM rank
  planner and the planner's parameter count all read;
- `gguf` (`GGUFArch`: llama.cpp architecture name, q/k permutation, whether its graph reads
  `rope_freqs` or LongRoPE's factor pair) and `gguf_fallback` (an architecture whose graph computes the same network with
  `rope_freqs`, or None: then per-frequency methods are refused);
- `trtllm_arch` and `trtllm_fields(cfg, rotary_base)`, or `trtllm_refusal` (why not, and what to use instead);
- `tiny` (synthetic variants for tests) and `known_features(entry)` (the planner's known bases).

Adding a family: one module below (imported at the end of this file) and, when the family brings a
block feature the model does not have yet, one flag in `ModelConfig` read by `pizoo.model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import PizooError  # noqa: F401  (families raise it)

if TYPE_CHECKING:
    from ..config import ModelConfig


# --------------------------------------------------------------------------------------------
# config.json fields


def hf_field(d: dict, key: str, source: str, kind: type | tuple, *, default: Any = ..., minimum: float | None = None):
    """d[key] checked to be `kind` (and >= minimum); missing -> default, or an error naming the key."""
    if key not in d or d[key] is None:
        if default is ...:
            raise PizooError(f"{source}: missing required field '{key}'")
        return default
    v = d[key]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if isinstance(v, bool) and kind is not bool or not isinstance(v, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise PizooError(f"{source}: field '{key}' must be {name}, got {v!r}")
    if minimum is not None and v < minimum:
        raise PizooError(f"{source}: field '{key}' must be >= {minimum}, got {v!r}")
    return v


# pizoo's activation names (ModelConfig.hidden_act) -> transformers' (config.json hidden_act)
HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


# --------------------------------------------------------------------------------------------
# The tensor table

# How TensorRT-LLM's tensor parallelism cuts a tensor (rank_plan in pizoo.export.trtllm):
#   replicate  whole tensor on every rank
#   rows       dim 0 in tp equal parts (column-parallel)
#   cols       dim 1 in tp equal parts (row-parallel)
#   q          query rows: the rank's heads
#   kv         key/value rows: the rank's KV heads (one repeated head when n_kv < tp)
#   vocab      dim 0 over the vocabulary padded to a multiple of tp
#   qkv_heads  a fused per-head q/k/v tensor (Tensor.qkv_per_head): the rank's heads, as Q|K|V blocks
TP_SPLITS = ("replicate", "rows", "cols", "q", "kv", "vocab", "qkv_heads")


@dataclass(frozen=True)
class Tensor:
    """One tensor of a family's checkpoint and where it goes in every format.

    `trt` names the TensorRT-LLM tensor ("{i}" is the layer number within its pipeline stage);
    several HF tensors with one `trt` name are concatenated on dim 0 in table order (q|k|v).
    `rotary` is "q" or "k" for the projections whose rows llama.cpp's llama graph wants permuted.
    `gguf_offset` is added to the values in the GGUF file (llama.cpp stores Gemma's (1 + w) norms
    with the one added; import subtracts it). `qkv_per_head`: a fused q/k/v tensor whose rows go per
    head [q_h | k_h | v_h] (GPT-NeoX), which llama.cpp and TensorRT-LLM want as Q|K|V blocks.
    """

    hf: str
    shape: tuple[int, ...]
    gguf: str | None
    trt: str | None = None
    split: str = "replicate"
    layer: int | None = None
    rotary: str | None = None
    gguf_offset: float = 0.0
    qkv_per_head: bool = False


def qkv_blocks(w, n_head: int):
    """Fused q/k/v rows per head [n_head, 3, head_dim, ...] (GPT-NeoX) -> Q|K|V blocks [3, n_head,
    head_dim, ...] (llama.cpp, TensorRT-LLM); a numpy array or a torch tensor, weight or bias."""
    shape = tuple(w.shape)
    return w.reshape(n_head, 3, shape[0] // (3 * n_head), *shape[1:]).swapaxes(0, 1).reshape(shape)


def qkv_per_head(w, n_head: int):
    """Inverse of `qkv_blocks`."""
    shape = tuple(w.shape)
    return w.reshape(3, n_head, shape[0] // (3 * n_head), *shape[1:]).swapaxes(0, 1).reshape(shape)


@dataclass(frozen=True)
class GGUFArch:
    """A llama.cpp architecture as pizoo writes it: its name, whether q/k rows are permuted to
    'adjacent pairs' order (only the llama graph rotates that way), whether its graph divides
    the frequencies by a `rope_freqs` tensor, and whether it reads LongRoPE's pair of factor tensors
    instead (`rope_factors_long/short`, chosen by the context against the original one: phi3), and
    whether it applies sliding windows (gemma2/gemma3) or attends to the whole context."""

    name: str
    permute_qk: bool
    rope_freqs: bool
    rope_factor_pair: bool = False
    sliding_window: bool = False


GGUF_LLAMA = GGUFArch("llama", permute_qk=True, rope_freqs=True)


# --------------------------------------------------------------------------------------------
# The base class


class Family:
    """A decoder-only RoPE family with Llama's block: RMSNorm, attention with grouped-query heads,
    SwiGLU MLP. Subclasses override the hooks where they differ."""

    model_type: str = ""  # config.json model_type, also pizoo's architecture name
    hf_class: str = ""  # config.json architectures[0]
    also_model_types: tuple[str, ...] = ()
    also_hf_classes: tuple[str, ...] = ()
    gguf: GGUFArch = GGUF_LLAMA
    gguf_fallback: GGUFArch | None = None
    trtllm_arch: str | None = "LlamaForCausalLM"
    trtllm_refusal: str = ""
    # The RoPE types its TensorRT-LLM model reads (None: every one pizoo writes for Llama) and why not.
    trtllm_rope_types: tuple[str, ...] | None = None
    trtllm_rope_refusal: str = ""
    tiny: dict[str, dict[str, Any]] = {}
    partial_rotary: bool = False  # reads partial_rotary_factor (ModelConfig.rotary_dim)
    lora_refusal: str = ""  # why --lora is refused for this family ("" : it is not)
    # llama.cpp (llama-vocab.cpp) applies this family's vocabulary rule to any GGUF whose general.name
    # holds one of the markers, looking the tokens up by text: (markers, tokens), or None.
    gguf_name_rule: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    # --- names ---------------------------------------------------------------------------
    @classmethod
    def hf_name(cls, name: str) -> str:
        """The checkpoint's name of one of pizoo's model parameters (the same for Llama-named families)."""
        return name

    @classmethod
    def model_name(cls, name: str) -> str:
        """pizoo's model parameter name of one of the checkpoint's tensors (inverse of hf_name)."""
        return name

    # --- config.json ---------------------------------------------------------------------
    @classmethod
    def features(cls, d: dict[str, Any], source: str, num_layers: int) -> dict[str, Any]:
        """ModelConfig feature fields read from config.json (family keys only)."""
        return {}

    @classmethod
    def activation(cls, d: dict[str, Any], source: str) -> str:
        """The MLP activation (ModelConfig.hidden_act) from config.json."""
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise PizooError(f"{source}: hidden_act '{act}' is not supported for {cls.model_type}; its SwiGLU MLP "
                             "uses silu")
        return "silu"

    @classmethod
    def window_layers(cls, num_layers: int) -> list[int]:
        """The layers a sliding window applies to when config.json does not list them: every layer."""
        return list(range(num_layers))

    @classmethod
    def hf_view(cls, d: dict[str, Any]) -> dict[str, Any]:
        """config.json as pizoo's parser reads it: the family's own key names mapped to the common
        ones (GPT-NeoX's rotary_pct), the global layers' RoPE keys at the top level (Gemma 3)."""
        return d

    @classmethod
    def hf_rope_layout(cls, cfg: ModelConfig, d: dict[str, Any]) -> None:
        """Rearrange the RoPE keys written to config.json `d` where the family's class reads them
        in another layout (Gemma 3: one rope_parameters entry per layer type)."""

    @classmethod
    def hf_keys(cls, cfg: ModelConfig) -> dict[str, Any]:
        """The family's own config.json keys, written over the preserved originals."""
        return {}

    @classmethod
    def hf_rope(cls, rope, rope_dim: int, context: int):
        """The RopeConfig written to config.json (a family whose transformers class reads only some
        RoPE types writes the others in a form it reads)."""
        return rope

    @staticmethod
    def partial_rotary_families() -> str:
        return ", ".join(f for f, fam in FAMILIES.items() if fam.partial_rotary) or "no family"

    @classmethod
    def known_features(cls, entry: dict[str, Any], num_layers: int) -> dict[str, Any]:
        """Feature fields for a known base's published shapes (pizoo/resources/aliases.toml)."""
        sliding = entry.get("sliding_window")
        return {"sliding_window": sliding, "sliding_window_layers": list(range(num_layers)) if sliding else []}

    # --- the tensor table ----------------------------------------------------------------
    @classmethod
    def global_tensors(cls, cfg: ModelConfig) -> list[Tensor]:
        h, v = cfg.hidden_size, cfg.vocab_size
        out = [Tensor("model.embed_tokens.weight", (v, h), "token_embd.weight", "transformer.vocab_embedding.weight"),
               Tensor("model.norm.weight", (h,), "output_norm.weight", "transformer.ln_f.weight")]
        if not cfg.tie_word_embeddings:
            out.append(Tensor("lm_head.weight", (v, h), "output.weight", "lm_head.weight", "vocab"))
        return out

    @classmethod
    def layer_tensors(cls, cfg: ModelConfig, i: int) -> list[Tensor]:
        h, inter = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        p, b, t = f"model.layers.{i}.", f"blk.{i}.", "transformer.layers.{i}."
        qkv = t + "attention.qkv."
        out = [Tensor(p + "input_layernorm.weight", (h,), b + "attn_norm.weight", t + "input_layernorm.weight"),
               Tensor(p + "self_attn.q_proj.weight", (q, h), b + "attn_q.weight", qkv + "weight", "q", rotary="q"),
               Tensor(p + "self_attn.k_proj.weight", (kv, h), b + "attn_k.weight", qkv + "weight", "kv", rotary="k"),
               Tensor(p + "self_attn.v_proj.weight", (kv, h), b + "attn_v.weight", qkv + "weight", "kv")]
        if cfg.attention_bias or cfg.qkv_bias:
            out += [Tensor(p + "self_attn.q_proj.bias", (q,), b + "attn_q.bias", qkv + "bias", "q", rotary="q"),
                    Tensor(p + "self_attn.k_proj.bias", (kv,), b + "attn_k.bias", qkv + "bias", "kv", rotary="k"),
                    Tensor(p + "self_attn.v_proj.bias", (kv,), b + "attn_v.bias", qkv + "bias", "kv")]
        if cfg.qk_norm:
            d = cfg.head_dim
            out += [Tensor(p + "self_attn.q_norm.weight", (d,), b + "attn_q_norm.weight", t + "attention.q_layernorm.weight"),
                    Tensor(p + "self_attn.k_norm.weight", (d,), b + "attn_k_norm.weight", t + "attention.k_layernorm.weight")]
        out.append(Tensor(p + "self_attn.o_proj.weight", (h, q), b + "attn_output.weight",
                          t + "attention.dense.weight", "cols"))
        if cfg.attention_bias:
            # Row-parallel: the bias is added once after the ranks' sum, so it is replicated.
            out.append(Tensor(p + "self_attn.o_proj.bias", (h,), b + "attn_output.bias", t + "attention.dense.bias"))
        out += [Tensor(p + "post_attention_layernorm.weight", (h,), b + "ffn_norm.weight", t + "post_layernorm.weight"),
                # TensorRT-LLM's MLP is proj(silu(fc(x)) * gate(x)): fc = gate_proj, gate = up_proj.
                Tensor(p + "mlp.gate_proj.weight", (inter, h), b + "ffn_gate.weight", t + "mlp.fc.weight", "rows"),
                Tensor(p + "mlp.up_proj.weight", (inter, h), b + "ffn_up.weight", t + "mlp.gate.weight", "rows"),
                Tensor(p + "mlp.down_proj.weight", (h, inter), b + "ffn_down.weight", t + "mlp.proj.weight", "cols")]
        return [Tensor(x.hf, x.shape, x.gguf, x.trt, x.split, i, x.rotary) for x in out]

    @classmethod
    def tensors(cls, cfg: ModelConfig) -> list[Tensor]:
        out = cls.global_tensors(cfg)
        for i in range(cfg.num_layers):
            out += cls.layer_tensors(cfg, i)
        return out

    # --- GGUF ----------------------------------------------------------------------------
    @classmethod
    def gguf_arch(cls, cfg: ModelConfig, needs_rope_freqs: bool, where: str) -> GGUFArch:
        """The llama.cpp architecture to write: the family's own, or its fallback when the scaling
        needs a rope_freqs tensor the own graph does not read; refused when there is none."""
        if not needs_rope_freqs or cls.gguf.rope_freqs:
            return cls.gguf
        if cls.gguf_fallback is not None:
            return cls.gguf_fallback
        raise PizooError(
            f"{where}: '{cfg.rope.method}' scaling needs per-frequency factors (a rope_freqs tensor), which "
            f"llama.cpp's {cls.gguf.name} graph does not read; extend with linear, ntk or yarn for GGUF "
            "(or export this model with --to hf)")

    @classmethod
    def gguf_matches(cls, arch: str, tensor_names: set[str]) -> bool:
        """Whether a GGUF file of llama.cpp architecture `arch` without pizoo's record is this family."""
        return arch == cls.gguf.name

    @classmethod
    def gguf_features(cls, recorded: Callable[[str, Any], Any], tensor_names: set[str]) -> dict[str, Any]:
        """Feature fields of an imported GGUF (`recorded(key, default)` reads a pizoo.* key)."""
        return {}

    @classmethod
    def gguf_keys(cls, cfg: ModelConfig) -> dict[str, Any]:
        """pizoo.* keys that record features llama.cpp's keys do not carry."""
        return {}

    # --- TensorRT-LLM --------------------------------------------------------------------
    @classmethod
    def check_trtllm(cls, cfg: ModelConfig, where: str) -> str:
        if cls.trtllm_arch is None:
            raise PizooError(f"{where}: {cls.trtllm_refusal}")
        return cls.trtllm_arch

    @classmethod
    def trtllm_fields(cls, cfg: ModelConfig, rotary_base: float) -> dict[str, Any]:
        """Family fields appended to TensorRT-LLM's config.json (`rotary_base`: the base it computes with,
        NTK's changed base included)."""
        return {"attn_bias": cfg.attention_bias}


# --------------------------------------------------------------------------------------------
# The registry

FAMILIES: dict[str, type[Family]] = {}  # model_type -> family, in registration order
_BY_CLASS: dict[str, type[Family]] = {}
_BY_TYPE: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family known by its model_type and HF architectures class."""
    FAMILIES[cls.model_type] = cls
    for t in (cls.model_type, *cls.also_model_types):
        _BY_TYPE[t] = cls
    for c in (cls.hf_class, *cls.also_hf_classes):
        _BY_CLASS[c] = cls
    return cls


# A family that is known but has a feature pizoo does not model: model_type -> the feature.
UNMODELLED: dict[str, str] = {}


def family(name: str) -> type[Family]:
    """The family registered as `name` (pizoo's architecture name = its model_type)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise PizooError(f"unknown architecture '{name}'; pizoo supports {supported()}") from None


def family_for_hf(model_type: str | None, architectures: list[str]) -> type[Family] | None:
    """The family of a config.json by model_type, else by its architectures classes."""
    if model_type and model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    return next((_BY_CLASS[a] for a in architectures if a in _BY_CLASS), None)


def family_for_gguf(arch: str, tensor_names: set[str]) -> type[Family] | None:
    """The family of a GGUF file pizoo did not write. Later (more specific) families are asked
    first: a Qwen2-shaped llama-arch file is Qwen2's before it is Llama's."""
    return next((f for f in reversed(FAMILIES.values()) if f.gguf_matches(arch, tensor_names)), None)


def gguf_archs() -> dict[str, GGUFArch]:
    """The llama.cpp architectures pizoo writes and reads, by name."""
    out: dict[str, GGUFArch] = {}
    for fam in FAMILIES.values():
        for a in (fam.gguf, fam.gguf_fallback):
            if a is not None:
                out.setdefault(a.name, a)
    return out


def supported() -> str:
    return ", ".join(FAMILIES)


def tiny_variants() -> dict[str, dict[str, Any]]:
    """Every family's tiny synthetic variants: name -> ModelConfig overrides."""
    out: dict[str, dict[str, Any]] = {}
    for fam in FAMILIES.values():
        for name, v in fam.tiny.items():
            out[name] = {"architecture": fam.model_type, **v}
    return out


# The families, in the order they are listed and matched.
from . import llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3, gptneox  # noqa: E402,F401
