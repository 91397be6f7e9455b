"""Gemma 3 text models (Gemma3ForCausalLM, model_type gemma3_text): Gemma 2's block with a per-head
RMSNorm on q and k (scaling by 1 + weight, like every Gemma norm), no soft-capping by default, and
five local (sliding-window) layers to each global one.

The local layers rotate with their own base (`rope_local_base_freq`, 10000) and are never scaled:
RoPE scaling applies to the global layers only. transformers v5 states that as one rope_parameters
entry per layer type (full_attention, sliding_attention); v4 as rope_scaling + rope_theta for the
global layers and rope_local_base_freq for the local ones. pizoo reads both and writes both.

GGUF is llama.cpp's `gemma3` graph, which keeps its local layers at base 10000 and unscaled, as
transformers does. The multimodal checkpoint (Gemma3ForConditionalGeneration, model_type gemma3)
is refused: extend its text model.
"""

from __future__ import annotations

from . import UNMODELLED, GGUFArch, PizooError, hf_field, register
from .gemma2 import Gemma2

UNMODELLED["gemma3"] = ("a vision tower (Gemma3ForConditionalGeneration, the multimodal checkpoint); extend its "
                        "text model (Gemma3ForCausalLM, model_type gemma3_text)")

DEFAULT_LOCAL_BASE = 10000.0  # transformers' and llama.cpp's rope_local_base_freq


@register
class Gemma3(Gemma2):
    model_type = "gemma3_text"
    hf_class = "Gemma3ForCausalLM"
    gguf = GGUFArch("gemma3", permute_qk=False, rope_freqs=False, sliding_window=True)
    window_period = 6
    gguf_scale_by_hidden_layers = (62,)
    tiny = {"gemma3": dict(num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, sliding_window=32,
                           hidden_act="gelu_tanh", norm_offset=True, sandwich_norms=True, embedding_scale=True,
                           qk_norm=True, local_rope_theta=DEFAULT_LOCAL_BASE,
                           # two layers, one of each kind (the published pattern is five local to one global)
                           sliding_window_layers=[0])}

    @classmethod
    def _local_rope(cls, d):
        params = d.get("rope_parameters")
        local = params.get("sliding_attention") if isinstance(params, dict) else None
        return local if isinstance(local, dict) else None

    @classmethod
    def hf_view(cls, d):
        params = d.get("rope_parameters")
        if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
            return {**d, "rope_parameters": params.get("full_attention") or {"rope_type": "default"}}
        return d

    @classmethod
    def features(cls, d, source, num_layers):
        out = super().features(d, source, num_layers)
        local = cls._local_rope(d)
        if local is not None and local.get("rope_type", "default") != "default":
            raise PizooError(f"{source}: rope_parameters.sliding_attention is '{local.get('rope_type')}'; Gemma 3's "
                             "local layers keep unscaled RoPE (scale full_attention only)")
        base = (local or {}).get("rope_theta", d.get("rope_local_base_freq", DEFAULT_LOCAL_BASE))
        base = hf_field({"rope_local_base_freq": base}, "rope_local_base_freq", source, float, minimum=1e-6)
        return {**out, "qk_norm": True, "local_rope_theta": base}

    @classmethod
    def hf_keys(cls, cfg):
        return {**super().hf_keys(cfg), "rope_local_base_freq": cfg.local_rope_theta}

    @classmethod
    def hf_rope_layout(cls, cfg, d):
        # rope_scaling / rope_theta (v4) and full_attention (v5) are the global layers' RoPE.
        d["rope_parameters"] = {"full_attention": d["rope_parameters"],
                                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}}

    @classmethod
    def known_features(cls, entry, num_layers):
        return {**super().known_features(entry, num_layers), "qk_norm": True,
                "local_rope_theta": float(entry.get("rope_local_base_freq", DEFAULT_LOCAL_BASE))}

    @classmethod
    def gguf_arch(cls, cfg, needs_rope_freqs, where):
        if cfg.local_rope_theta != DEFAULT_LOCAL_BASE:
            raise PizooError(f"{where}: rope_local_base_freq {cfg.local_rope_theta:g}: llama.cpp's gemma3 graph "
                             f"rotates local layers at base {DEFAULT_LOCAL_BASE:g}; export with --to hf")
        return super().gguf_arch(cfg, needs_rope_freqs, where)

    @classmethod
    def gguf_keys(cls, cfg):
        # which layers are local, one flag per layer (llama.cpp's default is the published 5:1 pattern)
        return {**super().gguf_keys(cfg), f"{cls.gguf.name}.attention.sliding_window_pattern":
                [cfg.layer_window(i) is not None for i in range(cfg.num_layers)]}

    @classmethod
    def gguf_features(cls, recorded, tensor_names):
        return {**super().gguf_features(recorded, tensor_names), "qk_norm": True,
                "local_rope_theta": DEFAULT_LOCAL_BASE}
