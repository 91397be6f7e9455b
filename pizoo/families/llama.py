"""Llama 1/2/3 (LlamaForCausalLM): the reference block. Optional q/k/v/o biases (attention_bias)."""

from __future__ import annotations

from typing import Any

from . import Family, register

# GGUF has no key for an output-projection bias flag; pizoo records it (import also infers it).
KEY_ATTENTION_BIAS = "pizoo.attention_bias"


@register
class Llama(Family):
    model_type = "llama"
    hf_class = "LlamaForCausalLM"
    tiny = {
        "llama": dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=False),
        "llama-gqa-tied": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    }

    @classmethod
    def features(cls, d, source, num_layers):
        return {"attention_bias": bool(d.get("attention_bias", False))}

    @classmethod
    def hf_keys(cls, cfg):
        return {"attention_bias": cfg.attention_bias, "mlp_bias": False}

    @classmethod
    def gguf_features(cls, recorded, tensor_names) -> dict[str, Any]:
        has_o_bias = "blk.0.attn_output.bias" in tensor_names
        return {"attention_bias": bool(recorded(KEY_ATTENTION_BIAS, has_o_bias))}

    @classmethod
    def gguf_keys(cls, cfg):
        return {KEY_ATTENTION_BIAS: True} if cfg.attention_bias else {}
