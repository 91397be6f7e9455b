"""GPT-NeoX / Pythia (GPTNeoXForCausalLM): the family the CLEX paper extends besides LLaMA.

Its block differs from Llama's everywhere:
- LayerNorm with bias (not RMSNorm), a plain GELU MLP with biases (dense_h_to_4h, dense_4h_to_h);
- the parallel residual (x + attn(ln1 x) + mlp(ln2 x)) when `use_parallel_residual` (Pythia);
- one fused query_key_value projection with biases, its rows per head [q_h | k_h | v_h];
- partial rotary: only the first rotary_pct of each head's dims rotate, and every RoPE method
  scales those dims alone;
- an untied output head `embed_out`.

pizoo's model keeps its own parameter names (model.layers.N.self_attn.qkv_proj, ...): `hf_names`
maps them to GPT-NeoX's, and the model reads the fused rows in GPT-NeoX's per-head order
(`qkv_per_head`), so a checkpoint loads and saves without moving a byte. llama.cpp's `gptneox`
graph and TensorRT-LLM want the fused rows as Q|K|V blocks: the tensor table says so
(`Tensor.qkv_per_head`) and both exports regroup them.

llama.cpp's gptneox graph reads no rope_freqs tensor: per-frequency methods are refused for GGUF.
TensorRT-LLM's GPTNeoXForCausalLM reads a base (`rotary_emb_base`) and `rotary_pct` but no RoPE
scaling, and builds only the parallel residual with a 4 x hidden MLP and LayerNorm epsilon 1e-5:
an unscaled or NTK-scaled model (NTK is exactly a changed base) of that shape is written, the rest
is refused naming what to use.
"""

from __future__ import annotations

import dataclasses
import math
import re

from . import Family, GGUFArch, PizooError, Tensor, hf_field, register

GELU_NAMES = ("gelu",)  # exact erf GELU; gelu_new / gelu_fast are other functions

# Module paths, pizoo's model <-> GPT-NeoX's checkpoint (the weight/bias suffix follows either way).
_LAYER = r"model\.layers\.(\d+)\."
_NEOX_LAYER = r"gpt_neox\.layers\.(\d+)\."
_PAIRS = (  # (pizoo pattern, pizoo form, GPT-NeoX pattern, GPT-NeoX form)
    (r"model\.embed_tokens", "model.embed_tokens", r"gpt_neox\.embed_in", "gpt_neox.embed_in"),
    (r"model\.norm", "model.norm", r"gpt_neox\.final_layer_norm", "gpt_neox.final_layer_norm"),
    (_LAYER + r"self_attn\.qkv_proj", r"model.layers.\1.self_attn.qkv_proj",
     _NEOX_LAYER + r"attention\.query_key_value", r"gpt_neox.layers.\1.attention.query_key_value"),
    (_LAYER + r"self_attn\.o_proj", r"model.layers.\1.self_attn.o_proj",
     _NEOX_LAYER + r"attention\.dense", r"gpt_neox.layers.\1.attention.dense"),
    (_LAYER + r"mlp\.up_proj", r"model.layers.\1.mlp.up_proj",
     _NEOX_LAYER + r"mlp\.dense_h_to_4h", r"gpt_neox.layers.\1.mlp.dense_h_to_4h"),
    (_LAYER + r"mlp\.down_proj", r"model.layers.\1.mlp.down_proj",
     _NEOX_LAYER + r"mlp\.dense_4h_to_h", r"gpt_neox.layers.\1.mlp.dense_4h_to_h"),
    (_LAYER + r"(input_layernorm|post_attention_layernorm)", r"model.layers.\1.\2",
     _NEOX_LAYER + r"(input_layernorm|post_attention_layernorm)", r"gpt_neox.layers.\1.\2"),
    (r"lm_head", "lm_head", r"embed_out", "embed_out"),
)
_TO_HF = [(re.compile(rf"^{mp}(?=\.|$)"), hf) for mp, _, _, hf in _PAIRS]
_TO_MODEL = [(re.compile(rf"^{hp}(?=\.|$)"), m) for _, m, hp, _ in _PAIRS]


def _rename(name: str, table) -> str:
    for pattern, repl in table:
        new, n = pattern.subn(repl, name, count=1)
        if n:
            return new
    return name


@register
class GPTNeoX(Family):
    model_type = "gpt_neox"
    hf_class = "GPTNeoXForCausalLM"
    gguf = GGUFArch("gptneox", permute_qk=False, rope_freqs=False)
    gguf_fallback = None
    trtllm_arch = "GPTNeoXForCausalLM"
    trtllm_rope_types = ("none", "ntk")
    trtllm_rope_refusal = ("TensorRT-LLM's GPTNeoXForCausalLM reads no RoPE scaling (only a base); extend with ntk "
                           "(a changed base) for TensorRT-LLM, or export with --to gguf")
    partial_rotary = True
    lora_refusal = ("--lora: LoRA for GPT-NeoX (a fused per-head query_key_value) is not supported yet; "
                    "calibrate in full (drop --lora)")
    # intermediate 4 x hidden (64): the only MLP width TensorRT-LLM's GPT-NeoX builds
    tiny = {"gpt_neox": dict(num_heads=4, num_kv_heads=4, head_dim=16, rotary_dim=4, tie_word_embeddings=False,
                             intermediate_size=256,
                             fused_qkv=True, qkv_per_head=True, attention_bias=True, norm_type="layernorm",
                             hidden_act="gelu", gated_mlp=False, mlp_bias=True, parallel_residual=True)}

    # --- names -------------------------------------------------------------------------------
    @classmethod
    def hf_name(cls, name: str) -> str:
        return _rename(name, _TO_HF)

    @classmethod
    def model_name(cls, name: str) -> str:
        return _rename(name, _TO_MODEL)

    # --- config.json -------------------------------------------------------------------------
    @classmethod
    def hf_view(cls, d):
        # GPT-NeoX's own key names -> the ones pizoo's parser reads (transformers' defaults where absent)
        out = dict(d)
        out.setdefault("rms_norm_eps", d.get("layer_norm_eps", 1e-5))
        params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
        if "partial_rotary_factor" not in d and "partial_rotary_factor" not in params:
            out["partial_rotary_factor"] = d.get("rotary_pct", 0.25)
        if "rope_theta" not in d and "rope_theta" not in params and "rotary_emb_base" in d:
            out["rope_theta"] = d["rotary_emb_base"]
        return out

    @classmethod
    def activation(cls, d, source):
        act = d.get("hidden_act", "gelu")
        if act not in GELU_NAMES:
            raise PizooError(f"{source}: hidden_act '{act}' is not modelled for GPT-NeoX; pizoo computes the exact "
                             "(erf) gelu that Pythia and GPT-NeoX-20B use")
        return "gelu"

    @classmethod
    def features(cls, d, source, num_layers):
        heads = hf_field(d, "num_attention_heads", source, int, minimum=1)
        if d.get("num_key_value_heads", heads) != heads:
            raise PizooError(f"{source}: num_key_value_heads in a GPT-NeoX config is not modelled (its fused "
                             "query_key_value holds one k and v per head)")
        if d.get("tie_word_embeddings"):
            raise PizooError(f"{source}: tie_word_embeddings=true in a GPT-NeoX config is not modelled (its "
                             "embed_out is a separate matrix)")
        return {"fused_qkv": True, "qkv_per_head": True, "norm_type": "layernorm", "gated_mlp": False,
                "mlp_bias": True, "attention_bias": bool(d.get("attention_bias", True)),
                "parallel_residual": bool(d.get("use_parallel_residual", True))}

    @classmethod
    def hf_keys(cls, cfg):
        return {"layer_norm_eps": cfg.rms_norm_eps, "use_parallel_residual": cfg.parallel_residual,
                "attention_bias": cfg.attention_bias, "hidden_act": "gelu"}

    @classmethod
    def hf_rope_layout(cls, cfg, d):
        # transformers v4 reads GPT-NeoX's own names for the base and the rotated fraction
        d["rotary_emb_base"] = d["rope_theta"]
        d["rotary_pct"] = cfg.rope_dim / cfg.head_dim

    @classmethod
    def known_features(cls, entry, num_layers):
        return {"fused_qkv": True, "qkv_per_head": True, "norm_type": "layernorm", "gated_mlp": False,
                "mlp_bias": True, "attention_bias": True, "hidden_act": "gelu",
                "parallel_residual": entry.get("use_parallel_residual", True),
                "rotary_dim": int(entry["hidden_size"] // entry["num_heads"] * entry.get("rotary_pct", 0.25)),
                "rms_norm_eps": 1e-5}

    # --- the tensor table --------------------------------------------------------------------
    @classmethod
    def global_tensors(cls, cfg):
        h, v = cfg.hidden_size, cfg.vocab_size
        return [Tensor("gpt_neox.embed_in.weight", (v, h), "token_embd.weight", "transformer.vocab_embedding.weight"),
                Tensor("gpt_neox.final_layer_norm.weight", (h,), "output_norm.weight", "transformer.ln_f.weight"),
                Tensor("gpt_neox.final_layer_norm.bias", (h,), "output_norm.bias", "transformer.ln_f.bias"),
                Tensor("embed_out.weight", (v, h), "output.weight", "lm_head.weight", "vocab")]

    @classmethod
    def layer_tensors(cls, cfg, i):
        h, inter = cfg.hidden_size, cfg.intermediate_size
        p, b, t = f"gpt_neox.layers.{i}.", f"blk.{i}.", "transformer.layers.{i}."
        out = [Tensor(p + "input_layernorm.weight", (h,), b + "attn_norm.weight", t + "input_layernorm.weight"),
               Tensor(p + "input_layernorm.bias", (h,), b + "attn_norm.bias", t + "input_layernorm.bias"),
               Tensor(p + "attention.query_key_value.weight", (3 * h, h), b + "attn_qkv.weight",
                      t + "attention.qkv.weight", "qkv_heads", qkv_per_head=True)]
        if cfg.attention_bias:
            out.append(Tensor(p + "attention.query_key_value.bias", (3 * h,), b + "attn_qkv.bias",
                              t + "attention.qkv.bias", "qkv_heads", qkv_per_head=True))
        out.append(Tensor(p + "attention.dense.weight", (h, h), b + "attn_output.weight", t + "attention.dense.weight",
                          "cols"))
        if cfg.attention_bias:  # row-parallel: added once after the ranks' sum, so replicated
            out.append(Tensor(p + "attention.dense.bias", (h,), b + "attn_output.bias", t + "attention.dense.bias"))
        out += [Tensor(p + "post_attention_layernorm.weight", (h,), b + "ffn_norm.weight",
                       t + "post_attention_layernorm.weight"),
                Tensor(p + "post_attention_layernorm.bias", (h,), b + "ffn_norm.bias",
                       t + "post_attention_layernorm.bias"),
                Tensor(p + "mlp.dense_h_to_4h.weight", (inter, h), b + "ffn_up.weight", t + "mlp.fc.weight", "rows"),
                Tensor(p + "mlp.dense_h_to_4h.bias", (inter,), b + "ffn_up.bias", t + "mlp.fc.bias", "rows"),
                Tensor(p + "mlp.dense_4h_to_h.weight", (h, inter), b + "ffn_down.weight", t + "mlp.proj.weight", "cols"),
                Tensor(p + "mlp.dense_4h_to_h.bias", (h,), b + "ffn_down.bias", t + "mlp.proj.bias")]
        return [dataclasses.replace(t, layer=i) for t in out]

    # --- TensorRT-LLM ----------------------------------------------------------------------------
    @classmethod
    def check_trtllm(cls, cfg, where):
        fixed = {"the parallel residual (use_parallel_residual=true)": cfg.parallel_residual,
                 "an MLP of 4 x hidden_size": cfg.intermediate_size == 4 * cfg.hidden_size,
                 "LayerNorm epsilon 1e-5": math.isclose(cfg.rms_norm_eps, 1e-5, rel_tol=1e-6),
                 "biases on every projection (attention_bias=true)": cfg.attention_bias}
        missing = [what for what, ok in fixed.items() if not ok]
        if missing:
            raise PizooError(f"{where}: TensorRT-LLM's GPTNeoXForCausalLM builds only {missing[0]}, which this "
                             "model does not have; export with --to gguf")
        return super().check_trtllm(cfg, where)

    @classmethod
    def trtllm_fields(cls, cfg, rotary_base):
        # GPT-NeoX's own field names (its model reads rotary_emb_base and rotary_pct, not rotary_base)
        return {"hidden_act": "gelu", "rotary_emb_base": rotary_base, "rotary_pct": cfg.rope_dim / cfg.head_dim,
                "rotary_scaling": None, "use_parallel_residual": True, "bias": True, "mlp_bias": True}

    # --- GGUF ----------------------------------------------------------------------------------
    @classmethod
    def gguf_keys(cls, cfg):
        a = cls.gguf.name
        return {f"{a}.use_parallel_residual": cfg.parallel_residual,
                f"{a}.attention.layer_norm_epsilon": float(cfg.rms_norm_eps)}

    @classmethod
    def gguf_features(cls, recorded, tensor_names):
        a = cls.gguf.name  # a file llama.cpp's converter wrote has the LayerNorm epsilon under its own key
        return {"fused_qkv": True, "qkv_per_head": True, "norm_type": "layernorm", "gated_mlp": False,
                "mlp_bias": True, "hidden_act": "gelu", "attention_bias": "blk.0.attn_qkv.bias" in tensor_names,
                "parallel_residual": bool(recorded(f"{a}.use_parallel_residual", True)),
                "rms_norm_eps": float(recorded(f"{a}.attention.layer_norm_epsilon", 1e-5))}
