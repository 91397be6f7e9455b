"""pizoo's decoder (the Llama block and the feature flags other families set) in one readable module.

Parameter names are Hugging Face's, so a checkpoint's state dict loads without renaming. RoPE comes
from pizoo.rope: one RotaryEmbedding for the global layers and, when local (sliding-window) layers
have a base of their own (Gemma 3), a second, never-scaled one for them. Attention is torch SDPA (the
flash kernel on GPU, causal, grouped-query). A sliding-window layer past its window, and any layer
with attention-logit soft-capping, runs in query blocks instead (`attend`): each block attends only
to the keys it can see, so memory grows with T x (window + block), never with T x T.

The forward returns hidden states; `logits` applies the head. Training and evaluation call the head
in chunks so a long sequence never materialises [T, vocab] float32 logits at once.

Generation passes a `KVCache`: each forward then appends its keys and values and attends over
everything cached, at positions that continue from the cached length. Keys stay rotated as they
were when computed (as in transformers and llama.cpp); the methods whose frequencies depend on the
sequence length (dynamic NTK; longrope past its threshold) are therefore not bit-identical to
recomputing the whole prefix at every step.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ATTENTION_BLOCK, ModelConfig, RopeConfig
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """RMSNorm; with `offset` (Gemma) the weight is stored as a delta and the norm scales by 1 + weight."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference implementations, then cast back. The offset form
        # scales in float32 before the cast (Gemma's order), the plain form after it (Llama's).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    if cfg.norm_type == "layernorm":  # with bias (GPT-NeoX)
        return nn.LayerNorm(dim or cfg.hidden_size, eps=cfg.rms_norm_eps)
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's soft-capping); x itself without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, past: int, scale: float | None,
           window: int | None, cap: float | None, block: int = ATTENTION_BLOCK) -> torch.Tensor:
    """Causal attention of the queries q [B, H, T, D] at positions past..past+T-1 over the keys and
    values k, v [B, Hkv, past+T, D] -> [B, H, T, D].

    Query i sees keys j <= i, and with a window only j in (i - window, i]; with `cap` the scaled
    scores become cap * tanh(scores / cap) before the mask. The plain cases are one SDPA call.
    Otherwise queries go `block` at a time, each against only the keys it can see, so the largest
    temporary is [B, H, block, window + block] (sliding) or [B, H, block, past + T] (global with a
    cap): memory linear in T, never a [T, T] mask.
    """
    T, S = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    windowed = window is not None and S > window
    if cap is None and not windowed and (past == 0 or T == 1):
        # a whole causal sequence, or one new token that sees every cached one
        return F.scaled_dot_product_attention(q, k, v, is_causal=past == 0, scale=scale, enable_gqa=gqa)
    if cap is not None and scale is None:
        scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for start in range(0, T, block):
        end = min(start + block, T)
        first = 0 if not windowed else max(0, past + start - window + 1)
        i = torch.arange(past + start, past + end, device=q.device)[:, None]
        j = torch.arange(first, past + end, device=q.device)[None, :]
        visible = (j <= i) & (j > i - window) if windowed else j <= i
        kb, vb = k[:, :, first:past + end], v[:, :, first:past + end]
        if cap is None:
            out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], kb, vb, attn_mask=visible,
                                                                  scale=scale, enable_gqa=gqa)
        else:
            out[:, :, start:end] = _capped_block(q[:, :, start:end], kb, vb, visible, scale, cap)
    return out


def _capped_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                  cap: float) -> torch.Tensor:
    """Eager attention of one query block with soft-capped scores (no fused kernel takes a cap)."""
    B, H, C, D = q.shape
    groups = H // k.shape[1]
    qg = q.view(B, k.shape[1], groups, C, D)  # grouped-query: each kv head serves its group, uncopied
    scores = softcap(torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scale, cap)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v[:, :, None]).view(B, H, C, D)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, in buffers preallocated for `capacity`
    tokens (allocated on a layer's first write, so the shapes and dtype are the model's own)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0  # tokens cached (advanced by LlamaModel.forward after all layers wrote)
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, D] after the cached tokens; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} tokens exceed the capacity of {self.capacity}")
        if layer not in self.layers:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.layers[layer] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self.layers[layer]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.qkv_sizes = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
        if cfg.fused_qkv:  # one projection whose output rows are q | k | v (Phi-3)
            self.qkv_proj = nn.Linear(h, sum(self.qkv_sizes), bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=qkv_bias)
            self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=qkv_bias)
            self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.attention_bias)
        if cfg.qk_norm:  # per-head RMSNorm of q and k after the projection, before RoPE (Qwen3, Gemma 3)
            self.q_norm = make_norm(cfg, d)
            self.k_norm = make_norm(cfg, d)
        self.qk_norm, self.fused_qkv, self.qkv_per_head = cfg.qk_norm, cfg.fused_qkv, cfg.qkv_per_head
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.window = cfg.layer_window(layer)
        self.layer = layer
        # None: SDPA's own 1/sqrt(head_dim), bit for bit what the Llama block always used.
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.cap = cfg.attn_logit_softcap

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_per_head:  # rows [q_h | k_h | v_h] for each head in turn (GPT-NeoX)
            q, k, v = self.qkv_proj(x).view(B, T, self.n_heads, 3 * self.head_dim).chunk(3, dim=-1)
        elif self.fused_qkv:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)
        out = attend(q, k, v, past=past, scale=self.scale, window=self.window, cap=self.cap)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)), SwiGLU (silu) or GeGLU (Gemma: tanh-approximated GELU); gate
    and up are one gate_up_proj when fused (Phi-3). Plain (GPT-NeoX): down(act(up(x))), with biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, inter, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.fused, self.gated = cfg.fused_gate_up, cfg.gated_mlp
        if self.fused:
            self.gate_up_proj = nn.Linear(h, 2 * inter, bias=bias)
        else:
            if self.gated:
                self.gate_proj = nn.Linear(h, inter, bias=bias)
            self.up_proj = nn.Linear(h, inter, bias=bias)
        self.down_proj = nn.Linear(inter, h, bias=bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(self.act(self.up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block. With `sandwich_norms` (Gemma 2/3) post_attention_layernorm normalises the
    attention output, pre_feedforward_layernorm the MLP input and post_feedforward_layernorm its
    output; without them post_attention_layernorm is the MLP's input norm, as in Llama. With
    `parallel_residual` (GPT-NeoX) attention and MLP both read the block's input:
    x + attn(ln1 x) + mlp(ln2 x)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(cfg)
            self.post_feedforward_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.sandwich, self.parallel = cfg.sandwich_norms, cfg.parallel_residual
        # A local (sliding-window) layer rotates with the local table when the family has one.
        self.local_rope = cfg.local_rope_theta is not None and self.self_attn.window is not None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if self.parallel:
            return x + self.self_attn(self.input_layernorm(x), cos, sin, cache) + self.mlp(self.post_attention_layernorm(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `model.` prefix of HF names: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)


class LlamaModel(nn.Module):
    """Causal LM. `forward` -> final hidden states [B, T, H]; `logits(hidden)` -> [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.rope_dim)
        # Local layers keep their own base and are never scaled (Gemma 3's local RoPE).
        self.local_rotary = (RotaryEmbedding(RopeConfig(theta=cfg.local_rope_theta), cfg.rope_dim)
                             if cfg.local_rope_theta is not None else None)
        self.activation_checkpointing = False

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states of input_ids [B, T]; with a cache, the tokens follow the cached ones."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        if self.config.embedding_scale:
            # sqrt(hidden) rounded to the model dtype first, as transformers' Gemma does.
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        tables = {False: self.rotary(position_ids, x.dtype)}
        if self.local_rotary is not None:
            tables[True] = self.local_rotary(position_ids, x.dtype)
        for layer in self.model.layers:
            cos, sin = tables[layer.local_rope]
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(F.linear(hidden, self.head_weight), self.config.final_logit_softcap)

    def forward_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.forward(input_ids, position_ids))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict under the checkpoint's names (tied head omitted, rotary buffers excluded)."""
        hf_name = self.config.family.hf_name
        return {hf_name(k): v for k, v in self.state_dict().items() if not k.startswith(("rotary.", "local_rotary."))}


def build_model(cfg: ModelConfig, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, empty: bool = True) -> LlamaModel:
    """Instantiate without spending time on random init when weights are loaded next."""
    if empty:
        with torch.device("meta"):
            model = LlamaModel(cfg)
        model = model.to_empty(device=device)
    else:
        with torch.device(device):
            model = LlamaModel(cfg)
    return model.to(dtype)


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               progress: bool = False) -> LlamaModel:
    """Load an HF folder into pizoo's model, streaming tensors from memory-mapped safetensors."""
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    dtype = dtype or torch.float32
    model = build_model(ckpt.config, device=device, dtype=dtype)
    params = dict(model.named_parameters())
    for name, tensor in ckpt.iter_model_tensors(progress=progress):
        if name in params:
            with torch.no_grad():
                params[name].copy_(tensor.to(dtype))
    return model.eval()


def chunked_log_probs(model: LlamaModel, hidden: torch.Tensor, targets: torch.Tensor,
                      chunk: int = 1024) -> torch.Tensor:
    """log p(target) per position, computing the head and log-softmax `chunk` positions at a time.

    hidden [N, H], targets [N] -> [N] float32. Peak memory is chunk x vocab, not N x vocab.
    """
    out = []
    w = model.head_weight
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start:start + chunk]
        logits = softcap(F.linear(h, w).float(), model.config.final_logit_softcap)
        lp = torch.log_softmax(logits, dim=-1)
        out.append(lp.gather(-1, targets[start:start + chunk, None]).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
