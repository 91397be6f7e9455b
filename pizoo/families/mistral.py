"""Mistral (MistralForCausalLM): Llama's block without biases, with sliding-window attention on
every layer. llama.cpp and TensorRT-LLM run it as a Llama."""

from __future__ import annotations

from . import hf_field, register
from .llama import Llama


@register
class Mistral(Llama):
    model_type = "mistral"
    hf_class = "MistralForCausalLM"
    tiny = {"mistral": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=False, sliding_window=4096)}

    @classmethod
    def features(cls, d, source, num_layers):
        sliding = hf_field(d, "sliding_window", source, int, default=None, minimum=1) if d.get("sliding_window") else None
        return {"sliding_window": sliding, "sliding_window_layers": list(range(num_layers)) if sliding else []}

    @classmethod
    def hf_keys(cls, cfg):
        return {"sliding_window": cfg.sliding_window}

    @classmethod
    def gguf_matches(cls, arch, tensor_names):
        return False  # a Mistral GGUF is a llama file; only pizoo's own record says Mistral

    @classmethod
    def gguf_features(cls, recorded, tensor_names):
        return {}

    @classmethod
    def gguf_keys(cls, cfg):
        return {}
