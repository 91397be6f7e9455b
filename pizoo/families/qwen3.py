"""Qwen3 (Qwen3ForCausalLM): Qwen2's layout without q/k/v biases, with an RMSNorm over each head of
q and k (after the projection, before RoPE) and an explicit head_dim (heads x head_dim may differ
from hidden_size).

llama.cpp's `qwen3` graph reads no rope_freqs tensor and no other architecture computes q/k norms
with it, so per-frequency methods (llama3, longrope, CLEX, baked dynamic NTK) are refused for GGUF;
linear, ntk and yarn are written as llama.cpp's keys. TensorRT-LLM's checkpoint format
(QWenForCausalLM) has no q/k norm, so that export is refused.
"""

from __future__ import annotations

from . import UNMODELLED, GGUFArch, PizooError, register
from .qwen2 import Qwen2

UNMODELLED["qwen3_moe"] = "mixture-of-experts MLP layers (num_experts, Qwen3MoeForCausalLM)"


@register
class Qwen3(Qwen2):
    model_type = "qwen3"
    hf_class = "Qwen3ForCausalLM"
    gguf = GGUFArch("qwen3", permute_qk=False, rope_freqs=False)
    gguf_fallback = None
    trtllm_arch = None
    trtllm_refusal = ("Qwen3's per-head q/k RMSNorm has no place in TensorRT-LLM's checkpoint format (its "
                      "QWenForCausalLM has no q/k norm); serve the HF folder with TensorRT-LLM's PyTorch backend "
                      "(trtllm-serve MODEL_DIR), or export with --to gguf")
    tiny = {"qwen3": dict(num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True, qk_norm=True)}

    @classmethod
    def features(cls, d, source, num_layers):
        if d.get("attention_bias"):
            raise PizooError(f"{source}: attention_bias=true (q/k/v/o biases) in a Qwen3 config is not modelled by "
                             "pizoo (published Qwen3 models have none); set it to false only if the weights have no "
                             "bias tensors")
        return {**super().features(d, source, num_layers), "qkv_bias": False, "qk_norm": True}

    @classmethod
    def known_features(cls, entry, num_layers):
        return {**super().known_features(entry, num_layers), "qkv_bias": False, "qk_norm": True}

    @classmethod
    def hf_keys(cls, cfg):
        return {"attention_bias": False}

    @classmethod
    def gguf_matches(cls, arch, tensor_names):
        return arch == cls.gguf.name

    @classmethod
    def gguf_features(cls, recorded, tensor_names):
        return {"qk_norm": True}
