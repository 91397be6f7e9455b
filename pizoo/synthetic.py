"""Synthetic checkpoints: real files with random weights and real trained tokenizers.

Tests and benchmarks build their models here, so they exercise the same file formats a user's
checkpoint has: config.json, safetensors (single or sharded), tokenizer.json, tokenizer_config.json
and generation_config.json. Tokenizers are trained on `pizoo.data.default_corpus_text()`-style text
that ships with Python (pydoc_data), so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import write_checkpoint
from .config import ModelConfig, RopeConfig
from .families import tiny_variants
from .model import LlamaModel

# Tiny variants covering the shapes pizoo must handle: every registered family's (pizoo.families).
VARIANTS = tiny_variants()

SPECIAL_BOS, SPECIAL_EOS, SPECIAL_UNK = "<s>", "</s>", "<unk>"


def sample_text(max_chars: int = 200_000) -> str:
    """Real English prose available on any Python install: the stdlib's pydoc topic texts."""
    from pydoc_data.topics import topics

    out, n = [], 0
    for key in sorted(topics):
        out.append(topics[key])
        n += len(topics[key])
        if n >= max_chars:
            break
    return "\n\n".join(out)[:max_chars]


def train_tokenizer(kind: str, vocab_size: int = 512, text: str | None = None):
    """Train a real tokenizer: 'bpe' (GPT-2 style byte-level BPE) or 'sentencepiece' (Llama-2 style
    BPE with byte fallback and the ▁ space marker)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    text = text if text is not None else sample_text()
    lines = text.splitlines()
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(lines, trainer)
    elif kind == "sentencepiece":
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        tok = Tokenizer(models.BPE(unk_token=SPECIAL_UNK, byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_UNK, SPECIAL_BOS, SPECIAL_EOS]
                                      + byte_tokens, show_progress=False)
        tok.train_from_iterator(lines, trainer)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    return tok


def write_tokenizer(out: Path, kind: str, vocab_size: int = 512) -> tuple[int, int, int]:
    """Write tokenizer.json + tokenizer_config.json; return (vocab size, bos id, eos id)."""
    from tokenizers import processors

    tok = train_tokenizer(kind, vocab_size)
    if kind == "bpe":
        bos = eos = tok.token_to_id("<|endoftext|>")
        bos_tok = eos_tok = "<|endoftext|>"
        add_bos = False
    else:
        bos, eos = tok.token_to_id(SPECIAL_BOS), tok.token_to_id(SPECIAL_EOS)
        bos_tok, eos_tok = SPECIAL_BOS, SPECIAL_EOS
        add_bos = True
        tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL_BOS} $A", pair=f"{SPECIAL_BOS} $A $B",
                                                           special_tokens=[(SPECIAL_BOS, bos)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_tok, "eos_token": eos_tok,
           "add_bos_token": add_bos, "add_eos_token": False, "model_max_length": 1 << 20,
           "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"}
    if kind == "sentencepiece":
        cfg["unk_token"] = SPECIAL_UNK
        cfg["legacy"] = False
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return tok.get_vocab_size(), bos, eos


def tiny_config(variant: str = "llama", *, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
                intermediate_size: int | None = None, max_position_embeddings: int = 64, rope: RopeConfig | None = None,
                head_dim: int | None = None, theta: float = 10000.0, bos: int | None = None, eos: int | None = None,
                **overrides) -> ModelConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {sorted(VARIANTS)}")
    v = dict(VARIANTS[variant])
    v.update(overrides)
    variant_head_dim = v.pop("head_dim", 16)
    head_dim = head_dim or variant_head_dim
    variant_intermediate = v.pop("intermediate_size", 128)
    intermediate_size = intermediate_size or variant_intermediate
    sliding = v.pop("sliding_window", None)
    layers = v.pop("sliding_window_layers", None)
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_layers=num_layers, head_dim=head_dim, max_position_embeddings=max_position_embeddings,
                      rope=rope or RopeConfig(theta=theta), rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos,
                      sliding_window=sliding, **v)
    if sliding:
        cfg.sliding_window_layers = layers if layers is not None else cfg.family.window_layers(cfg.num_layers)
    return cfg


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> LlamaModel:
    """A model with seeded random weights (norm weights jittered so they are not trivially ones)."""
    gen = torch.Generator().manual_seed(seed)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # about one, as the norm applies it (1 + w with an offset)
                p.copy_((0.0 if cfg.norm_offset else 1.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen) * (5 if "embed" in name else 1))
    return model.eval()


def write_tiny_model(out: str | Path, variant: str = "llama", *, tokenizer: str = "bpe", seed: int = 0,
                     rope: RopeConfig | None = None, dtype: torch.dtype = torch.float32,
                     max_shard_bytes: int | None = None, overwrite: bool = False, **config_overrides) -> Path:
    """Write a complete tiny HF checkpoint folder (weights, config, tokenizer, generation config)."""
    import tempfile

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab, bos, eos = write_tokenizer(tmp, tokenizer, config_overrides.pop("vocab_size", 512))
        cfg = tiny_config(variant, vocab_size=vocab, rope=rope, bos=bos, eos=eos, **config_overrides)
        cfg.torch_dtype = str(dtype).removeprefix("torch.")
        if rope is not None and rope.is_scaled:
            cfg.raw["pizoo"] = {"rope_method": rope.method}
        model = random_model(cfg, seed).to(dtype)
        gen = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        return write_checkpoint(out, cfg, model.hf_state_dict().items(), copy_files_from=tmp,
                                overwrite=overwrite, **kwargs)


def write_synthetic_llama(out: str | Path, *, hidden_size: int = 2048, num_layers: int = 22,
                          intermediate_size: int = 5632, num_heads: int = 32, num_kv_heads: int = 4,
                          vocab_size: int = 32000, max_position_embeddings: int = 4096,
                          dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 1 << 30,
                          tokenizer: str = "sentencepiece", seed: int = 0, overwrite: bool = False) -> Path:
    """A large random Llama checkpoint (default ~1.1B params, TinyLlama's shape) streamed to disk
    tensor by tensor, for conversion and memory benchmarks."""
    import tempfile

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, bos, eos = write_tokenizer(tmp, tokenizer, 512)
        cfg = ModelConfig(architecture="llama", vocab_size=vocab_size, hidden_size=hidden_size,
                          intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads,
                          max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                          bos_token_id=bos, eos_token_id=eos, torch_dtype=str(dtype).removeprefix("torch."))
        gen = torch.Generator().manual_seed(seed)

        def tensors():
            for name, shape in cfg.expected_shapes().items():
                if len(shape) == 1:
                    yield name, torch.ones(shape, dtype=dtype)
                else:
                    yield name, (0.02 * torch.randn(shape, generator=gen)).to(dtype)

        # The tokenizer is tiny; ids beyond it are never produced, which is fine for benchmarks.
        return write_checkpoint(out, cfg, tensors(), copy_files_from=tmp, max_shard_bytes=max_shard_bytes,
                                overwrite=overwrite)
