"""Phi-3 / Phi-3.5 / Phi-4-mini (Phi3ForCausalLM): Llama's block with one fused `qkv_proj` (rows
q | k | v) and one fused `gate_up_proj` (rows gate | up), native LongRoPE scaling (short factors up
to the original context, long factors past it, one attention factor for both), optional partial
rotary (Phi-4-mini rotates 3/4 of each head) and a sliding window on every layer (Phi-3-mini-4k).

transformers' Phi3 reads only the default RoPE and `longrope`, so every other method is written in
Phi-3's own longrope form: its per-frequency factors (base / scaled frequency) and its attention
factor, short = long for the static methods, short = ones (unscaled) for dynamic NTK, whose long
factors are baked at the target length. CLEX is baked to longrope anyway (pizoo.clex).

GGUF is llama.cpp's `phi3` graph, which reads exactly that form: the two factor tensors
(`rope_factors_long/short`, long iff llama.cpp's context is past the original one), the attention
factor and a rotary dim. TensorRT-LLM is refused for now, naming the format to use.
"""

from __future__ import annotations

import dataclasses

from . import Family, GGUFArch, Tensor, hf_field, register


@register
class Phi3(Family):
    model_type = "phi3"
    hf_class = "Phi3ForCausalLM"
    gguf = GGUFArch("phi3", permute_qk=False, rope_freqs=False, rope_factor_pair=True)
    gguf_fallback = None
    trtllm_arch = None
    trtllm_refusal = ("pizoo does not write Phi-3 as a TensorRT-LLM checkpoint; serve the HF folder with "
                      "TensorRT-LLM's PyTorch backend (trtllm-serve MODEL_DIR) (pizoo extend: --formats hf)")
    partial_rotary = True
    # right-stripping special tokens for any file named so, whatever its architecture
    gguf_name_rule = (("phi-3", "phi3"), ("</s>", "<unk>", "<s>", "<|endoftext|>"))
    tiny = {"phi3": dict(num_heads=4, num_kv_heads=2, head_dim=16, rotary_dim=12, tie_word_embeddings=False,
                         fused_qkv=True, fused_gate_up=True)}

    @classmethod
    def features(cls, d, source, num_layers):
        window = hf_field(d, "sliding_window", source, int, default=None, minimum=1)
        return {"fused_qkv": True, "fused_gate_up": True, "sliding_window": window,
                "sliding_window_layers": list(range(num_layers)) if window else []}

    @classmethod
    def known_features(cls, entry, num_layers):
        out = {**super().known_features(entry, num_layers), "fused_qkv": True, "fused_gate_up": True}
        if entry.get("partial_rotary_factor"):
            head_dim = entry.get("head_dim", entry["hidden_size"] // entry["num_heads"])
            out["rotary_dim"] = int(head_dim * entry["partial_rotary_factor"])
        return out

    @classmethod
    def hf_keys(cls, cfg):
        # Phi3Config's defaults (pad 32000, no window) would otherwise fill in missing keys.
        return {"sliding_window": cfg.sliding_window, "pad_token_id": cfg.raw.get("pad_token_id")}

    @classmethod
    def hf_rope(cls, rope, rope_dim, context):
        if rope.type in ("none", "longrope"):
            return rope
        from ..rope import base_inv_freq, inv_freq_for

        inv, attention = inv_freq_for(rope, rope_dim, max(context, rope.original_context))
        long = (base_inv_freq(rope.theta, rope_dim) / inv).tolist()
        short = [1.0] * len(long) if rope.type == "dynamic" else long
        return dataclasses.replace(rope, type="longrope", short_factor=short, long_factor=long,
                                   attention_factor=float(attention), method=rope.method or rope.type)

    @classmethod
    def layer_tensors(cls, cfg, i):
        h, inter = cfg.hidden_size, cfg.intermediate_size
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        p, b = f"model.layers.{i}.", f"blk.{i}."
        return [Tensor(p + "input_layernorm.weight", (h,), b + "attn_norm.weight", layer=i),
                Tensor(p + "self_attn.qkv_proj.weight", (qkv, h), b + "attn_qkv.weight", layer=i),
                Tensor(p + "self_attn.o_proj.weight", (h, cfg.num_heads * cfg.head_dim), b + "attn_output.weight",
                       layer=i),
                Tensor(p + "post_attention_layernorm.weight", (h,), b + "ffn_norm.weight", layer=i),
                # llama.cpp's phi3 graph reads gate | up as one ffn_up and splits it itself.
                Tensor(p + "mlp.gate_up_proj.weight", (2 * inter, h), b + "ffn_up.weight", layer=i),
                Tensor(p + "mlp.down_proj.weight", (h, inter), b + "ffn_down.weight", layer=i)]

    @classmethod
    def gguf_features(cls, recorded, tensor_names):
        return {"fused_qkv": True, "fused_gate_up": True}
