"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama's block with q/k/v biases (no output bias) and
optional sliding-window attention on the layers from max_window_layers on."""

from __future__ import annotations

from . import GGUF_LLAMA, Family, GGUFArch, hf_field, register


@register
class Qwen2(Family):
    model_type = "qwen2"
    hf_class = "Qwen2ForCausalLM"
    gguf = GGUFArch("qwen2", permute_qk=False, rope_freqs=False)
    # llama.cpp's llama graph is the same network (q/k/v biases included) and reads rope_freqs.
    gguf_fallback = GGUF_LLAMA
    trtllm_arch = "QWenForCausalLM"
    tiny = {"qwen2": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=False, qkv_bias=True)}

    @classmethod
    def features(cls, d, source, num_layers):
        out = {"qkv_bias": True}
        if d.get("use_sliding_window") and d.get("sliding_window"):
            first = hf_field(d, "max_window_layers", source, int, default=num_layers)
            out.update(sliding_window=hf_field(d, "sliding_window", source, int, minimum=1),
                       sliding_window_layers=list(range(first, num_layers)))
        return out

    @classmethod
    def known_features(cls, entry, num_layers):
        return {**super().known_features(entry, num_layers), "qkv_bias": True}

    @classmethod
    def gguf_matches(cls, arch, tensor_names):
        # A llama-arch file with q/k/v biases but no output bias is a Qwen2-shaped network.
        qwen2_shaped = "blk.0.attn_q.bias" in tensor_names and "blk.0.attn_output.bias" not in tensor_names
        return arch == cls.gguf.name or (arch == GGUF_LLAMA.name and qwen2_shaped)

    @classmethod
    def gguf_features(cls, recorded, tensor_names):
        return {"qkv_bias": True}

    @classmethod
    def trtllm_fields(cls, cfg, rotary_base):
        # QWen's attention has q/k/v biases and no dense bias; qwen_type selects the Qwen2 layout.
        return {"qwen_type": "qwen2", "attn_bias": True, "use_logn_attn": False}
