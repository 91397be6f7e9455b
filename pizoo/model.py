"""pizoo's decoder (the Llama block and the feature flags other families set) in one readable module.

Parameter names are Hugging Face's, so a checkpoint's state dict loads without renaming. RoPE comes
from pizoo.rope (one RotaryEmbedding shared by all layers). Attention is torch SDPA: the flash kernel
on GPU, causal, with grouped-query attention and an optional sliding window (Mistral, Qwen2).

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

from .config import ModelConfig
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference implementations, then cast back.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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
        if cfg.qk_norm:  # per-head RMSNorm of q and k after the projection, before RoPE (Qwen3)
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm, self.fused_qkv = cfg.qk_norm, cfg.fused_qkv
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.window = cfg.layer_window(layer)
        self.layer = layer

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused_qkv:
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
        # enable_gqa lets SDPA share each kv head across its query group without copying k/v.
        gqa = self.n_kv != self.n_heads
        windowed = self.window is not None and past + T > self.window
        if windowed or (past and T > 1):
            # Query at position i sees keys j <= i, and with a sliding window only j in (i - window, i].
            # Only built when it matters (SDPA's is_causal aligns queries with the first keys).
            i = torch.arange(past, past + T, device=x.device)[:, None]
            j = torch.arange(past + T, device=x.device)[None, :]
            mask = (j <= i) & (j > i - self.window) if windowed else j <= i
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:  # a whole causal sequence, or one new token that sees every cached one
            out = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up are one gate_up_proj when fused (Phi-3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, inter = cfg.hidden_size, cfg.intermediate_size
        self.fused = cfg.fused_gate_up
        if self.fused:
            self.gate_up_proj = nn.Linear(h, 2 * inter, bias=False)
        else:
            self.gate_proj = nn.Linear(h, inter, bias=False)
            self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `model.` prefix of HF names: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaModel(nn.Module):
    """Causal LM. `forward` -> final hidden states [B, T, H]; `logits(hidden)` -> [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.rope_dim)
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
        cos, sin = self.rotary(position_ids, x.dtype)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight)

    def forward_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.forward(input_ids, position_ids))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict under HF names (tied head omitted, rotary buffers excluded)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("rotary.")}


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
    for name, tensor in ckpt.iter_tensors(progress=progress):
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
        logits = F.linear(h, w).float()
        lp = torch.log_softmax(logits, dim=-1)
        out.append(lp.gather(-1, targets[start:start + chunk, None]).squeeze(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
