"""Gemma 2 (Gemma2ForCausalLM): Llama's tensor names on a different block.

- RMSNorms scale by (1 + weight) (the stored weight is a delta around zero);
- the embedding is multiplied by sqrt(hidden_size) (rounded to the model dtype first);
- a GeGLU MLP with the tanh-approximated GELU;
- sandwich norms: the attention output and the MLP output are normalised before their residual
  add, and the MLP input has its own norm (pre_feedforward_layernorm);
- attention scaled by query_pre_attn_scalar^-0.5 instead of head_dim^-0.5;
- soft-capping of the attention scores and of the final logits (cap * tanh(x / cap));
- local (sliding-window) and global layers interleaved: every second layer is global, layer 0 is
  local. Every RoPE method scales all layers (one base for both kinds).

GGUF is llama.cpp's `gemma2` graph, which computes all of the above itself, reads no rope_freqs
tensor (so per-frequency methods are refused) and stores the norms with the one added. It derives
the attention scale from the model size rather than reading query_pre_attn_scalar, so a config whose
scalar differs from llama.cpp's choice is refused. TensorRT-LLM is refused: its Gemma checkpoint
applies one rotary_scaling to every layer and has no window field (tensorrt_llm/models/gemma).
"""

from __future__ import annotations

import dataclasses

from . import Family, GGUFArch, PizooError, Tensor, hf_field, register

GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_tanh")


def _number(x: float) -> int | float:
    """An int where the value is one: transformers' strict config wants query_pre_attn_scalar as int."""
    return int(x) if float(x).is_integer() else x


@register
class Gemma2(Family):
    model_type = "gemma2"
    hf_class = "Gemma2ForCausalLM"
    gguf = GGUFArch("gemma2", permute_qk=False, rope_freqs=False, sliding_window=True)
    gguf_fallback = None
    trtllm_arch = None
    # TensorRT-LLM's Gemma checkpoint applies one rotary_scaling to local and global layers alike and
    # takes sliding windows only as a runtime setting, so an extended Gemma would compute differently.
    trtllm_refusal = ("TensorRT-LLM's Gemma checkpoint scales local and global layers alike and has no sliding "
                      "window field, so an extended Gemma cannot be written faithfully; serve the HF folder with "
                      "TensorRT-LLM's PyTorch backend (trtllm-serve MODEL_DIR), or export with --to gguf")
    # Every `window_period`-th layer (counting from 1) is global, the others are local.
    window_period = 2
    # llama.cpp's layer counts for the sizes whose attention scale is hidden/heads (the 27B models).
    gguf_scale_by_hidden_layers: tuple[int, ...] = (46,)
    # query_pre_attn_scalar None: head_dim^-0.5 (what llama.cpp computes for any head_dim)
    tiny = {"gemma2": dict(num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, sliding_window=32,
                           hidden_act="gelu_tanh", norm_offset=True, sandwich_norms=True, embedding_scale=True,
                           attn_logit_softcap=50.0, final_logit_softcap=30.0)}

    # --- config.json -------------------------------------------------------------------------
    @classmethod
    def activation(cls, d, source):
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in GELU_TANH_NAMES:
            raise PizooError(f"{source}: hidden_activation '{act}' is not supported for {cls.model_type}; its GeGLU "
                             "MLP uses gelu_pytorch_tanh")
        return "gelu_tanh"

    @classmethod
    def window_layers(cls, num_layers):
        return [i for i in range(num_layers) if (i + 1) % cls.window_period]

    @classmethod
    def features(cls, d, source, num_layers):
        if d.get("use_bidirectional_attention"):
            raise PizooError(f"{source}: use_bidirectional_attention=true (an embedding model's non-causal "
                             "attention) is not modelled by pizoo; extend the causal language model")
        if d.get("attention_bias"):
            raise PizooError(f"{source}: attention_bias=true is not modelled for {cls.model_type} (published Gemma "
                             "models have no attention biases)")
        window = hf_field(d, "sliding_window", source, int, default=None, minimum=1)
        types = d.get("layer_types")
        if isinstance(types, list):
            if len(types) != num_layers or not set(types) <= {"sliding_attention", "full_attention"}:
                raise PizooError(f"{source}: layer_types must list sliding_attention or full_attention for each of "
                                 f"the {num_layers} layers")
            layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
        else:
            layers = cls.window_layers(num_layers)
        caps = {k: hf_field(d, key, source, float, default=None, minimum=1e-6)
                for k, key in (("attn_logit_softcap", "attn_logit_softcapping"),
                               ("final_logit_softcap", "final_logit_softcapping"))}
        return {"sliding_window": window, "sliding_window_layers": layers if window else [], "norm_offset": True,
                "sandwich_norms": True, "embedding_scale": True,
                "query_pre_attn_scalar": hf_field(d, "query_pre_attn_scalar", source, float, default=256.0,
                                                  minimum=1e-6), **caps}

    @classmethod
    def hf_keys(cls, cfg):
        types = ["sliding_attention" if cfg.layer_window(i) else "full_attention" for i in range(cfg.num_layers)]
        return {"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
                "sliding_window": cfg.sliding_window, "layer_types": types,
                "query_pre_attn_scalar": _number(cfg.query_pre_attn_scalar or cfg.head_dim),
                "attn_logit_softcapping": cfg.attn_logit_softcap, "final_logit_softcapping": cfg.final_logit_softcap}

    @classmethod
    def known_features(cls, entry, num_layers):
        window = entry.get("sliding_window")
        return {"sliding_window": window, "sliding_window_layers": cls.window_layers(num_layers) if window else [],
                "hidden_act": "gelu_tanh", "norm_offset": True, "sandwich_norms": True, "embedding_scale": True,
                "query_pre_attn_scalar": float(entry.get("query_pre_attn_scalar", 256)),
                "attn_logit_softcap": entry.get("attn_logit_softcapping"),
                "final_logit_softcap": entry.get("final_logit_softcapping")}

    # --- the tensor table --------------------------------------------------------------------
    @classmethod
    def global_tensors(cls, cfg):
        return [dataclasses.replace(t, gguf_offset=1.0) if t.hf == "model.norm.weight" else t
                for t in super().global_tensors(cfg)]

    @classmethod
    def layer_tensors(cls, cfg, i):
        h, p, b = cfg.hidden_size, f"model.layers.{i}.", f"blk.{i}."
        out = []
        for t in super().layer_tensors(cfg, i):
            if t.hf == p + "post_attention_layernorm.weight":
                # the attention output's norm here, not the MLP input's (that is pre_feedforward_layernorm)
                t = dataclasses.replace(t, gguf=b + "post_attention_norm.weight")
                out += [t, Tensor(p + "pre_feedforward_layernorm.weight", (h,), b + "ffn_norm.weight", layer=i),
                        Tensor(p + "post_feedforward_layernorm.weight", (h,), b + "post_ffw_norm.weight", layer=i)]
            else:
                out.append(t)
        # llama.cpp stores every (1 + w) norm with the one added
        return [dataclasses.replace(t, gguf_offset=1.0, trt=None) if t.hf.endswith("norm.weight")
                else dataclasses.replace(t, trt=None) for t in out]

    # --- GGUF ----------------------------------------------------------------------------------
    @classmethod
    def llama_cpp_scalar(cls, num_layers: int, hidden_size: int, num_heads: int, head_dim: int) -> float:
        """The query_pre_attn_scalar llama.cpp's graph uses: it reads none, and derives it from the
        model size (hidden / heads for the 27B layer counts, head_dim otherwise)."""
        return float(hidden_size / num_heads if num_layers in cls.gguf_scale_by_hidden_layers else head_dim)

    @classmethod
    def gguf_arch(cls, cfg, needs_rope_freqs, where):
        scale_by = cls.llama_cpp_scalar(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim)
        if cfg.query_pre_attn_scalar is not None and abs(cfg.query_pre_attn_scalar - scale_by) > 1e-6:
            raise PizooError(f"{where}: query_pre_attn_scalar {cfg.query_pre_attn_scalar:g} is not the {scale_by:g} "
                             f"llama.cpp's {cls.gguf.name} graph uses for a {cfg.num_layers}-layer model, so the "
                             "GGUF would compute different attention; export with --to hf")
        return super().gguf_arch(cfg, needs_rope_freqs, where)

    @classmethod
    def gguf_keys(cls, cfg):
        a = cls.gguf.name
        out = {}
        if cfg.sliding_window is not None:
            out[f"{a}.attention.sliding_window"] = int(cfg.sliding_window)
        if cfg.attn_logit_softcap is not None:
            out[f"{a}.attn_logit_softcapping"] = float(cfg.attn_logit_softcap)
        if cfg.final_logit_softcap is not None:
            out[f"{a}.final_logit_softcapping"] = float(cfg.final_logit_softcap)
        return out

    @classmethod
    def gguf_features(cls, recorded, tensor_names):
        # A file llama.cpp's converter wrote has no pizoo keys: the window layers follow the family's
        # pattern and the attention scale is the one llama.cpp derives (see gguf_arch).
        a = cls.gguf.name
        window = recorded(f"{a}.attention.sliding_window", None)
        n_layers, hidden = int(recorded(f"{a}.block_count", 0)), int(recorded(f"{a}.embedding_length", 0))
        heads = int(recorded(f"{a}.attention.head_count", 1))
        head_dim = int(recorded(f"{a}.attention.key_length", hidden // heads))
        layers = recorded("pizoo.sliding_window_layers", None)
        return {"hidden_act": "gelu_tanh", "norm_offset": True, "sandwich_norms": True, "embedding_scale": True,
                "sliding_window": int(window) if window else None,
                "sliding_window_layers": ([int(x) for x in layers] if layers is not None
                                          else cls.window_layers(n_layers)) if window else [],
                "query_pre_attn_scalar": cls.llama_cpp_scalar(n_layers, hidden, heads, head_dim),
                "attn_logit_softcap": recorded(f"{a}.attn_logit_softcapping", None),
                "final_logit_softcap": recorded(f"{a}.final_logit_softcapping", None)}
