"""HF folder -> GGUF (llama.cpp) with the RoPE scaling inside, streamed tensor by tensor.

What llama.cpp computes from the written file equals what the HF model computes at the extended
length (tests compare logits through llama-cpp-python). How each scaling method is stored, and why
(checked against the llama.cpp sources vendored by llama-cpp-python 0.3.36):

- context_length is always the extended length, so llama.cpp's n_ctx_train is right.
- linear: rope.scaling.type linear + factor (llama.cpp uses freq_scale = 1/factor).
- yarn (default betas 32/1, truncated ramp): type yarn + factor + original_context_length. llama.cpp
  always multiplies cos/sin by 0.1*ln(s)+1 for yarn and then by rope.scaling.attn_factor, and for
  arch llama it ignores rope.scaling.yarn_attn_factor / yarn_beta_*; so an HF attention_factor (or
  mscale pair) is written as attn_factor = hf_factor / (0.1*ln(s)+1). Non-default betas or an
  untruncated ramp are written as per-frequency factors instead (exact).
- ntk: the changed rope.freq_base (no scaling type).
- llama3, baked clex (longrope with method clex), longrope, baked dynamic NTK and yarn variants:
  a `rope_freqs` tensor (llama.cpp divides each frequency by it) plus attn_factor when the method
  has an attention factor. llama.cpp's qwen2 graph ignores rope_freqs, so a qwen2 model with such a
  scaling is written as arch llama (q/k permuted, q/k/v biases kept): llama.cpp's llama graph is the
  same network with the rope_freqs input.
- dynamic NTK has no static form; it is refused unless the user names a length to bake it at.
- an architecture whose graph reads LongRoPE's factor pair (phi3) gets every method in that form
  (the family's own config form, pizoo.families.phi3): `rope_factors_long` / `rope_factors_short`
  tensors, rope.scaling.original_context_length (llama.cpp uses the long factors iff its context
  is past it) and attn_factor (llama.cpp multiplies cos/sin by it at every length, as HF does).
- rope.dimension_count is the rotary dim (Phi-4-mini rotates 3/4 of each head).

A `pizoo.*` block of keys (ignored by llama.cpp) records the exact RoPE config, the original
architecture and the sliding window, so `pizoo import` restores the model bit for bit.

The data section is written by a pipeline that never imports torch (it would add ~220 MiB of
resident memory; only yarn's attention factor and per-frequency RoPE tables need it, via pizoo.rope): worker threads read
the safetensors bytes in row chunks with os.preadv and permute q/k, convert (bf16 -> f16 by integer
ops, q8_0 by vectorised numpy, bit-identical to ggml) at most a few chunks ahead of the main thread,
which writes them in order while a background fdatasync keeps the kernel's writeback going. Resident
memory stays at a few chunks whatever the model size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..config import ModelConfig, RopeConfig, ntk_theta, rope_to_dict
from ..errors import PizooError
from ..families import FAMILIES
from ..hf_folder import TensorInfo, index_hf_folder
from ..lineage import artifact_stem, model_identity, split_size

log = logging.getLogger("pizoo.gguf")

# --------------------------------------------------------------------------------------------
# Names, types and tables shared with pizoo.gguf_import

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
# general.file_type values (llama.cpp's LlamaFileType)
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
QUANT_BLOCK = 32  # Q8_0 block size (elements)
# RoPE tensors: llama.cpp divides each frequency by one of them; none is a weight of the network.
ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT = \
    "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"
ROPE_TENSORS = (ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT)
Q8_0_BLOCK_BYTES = 34  # f16 scale + 32 int8

def permute_rows(w, n_head: int):
    """HF 'rotate halves' q/k rows -> llama.cpp 'adjacent pairs' order (per head: halves interleaved).

    Works on weights [rows, cols] and biases [rows], numpy arrays or torch tensors; `w` may hold any
    whole number of heads.
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def unpermute_rows(w, n_head: int):
    """Inverse of `permute_rows`."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


# Byte-level BPE pre-tokenizers pizoo recognises, as the regexes HF tokenizer.json files carry.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's name for Qwen2's pre-tokenizer (a tokenizer name that other families' files carry
# too; it is not a model-family check).
PRE_QWEN2 = "qwen2"

# Canonical pre-tokenizer signature -> llama.cpp tokenizer.ggml.pre name. A signature lists the
# pre-tokenizer steps: ("ByteLevel", use_regex), ("Digits", individual_digits), ("Split", regex).
PRE_SIGNATURES: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_REGEX), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_REGEX), ("ByteLevel", False)): PRE_QWEN2,
}
# llama.cpp pre-tokenizer names -> the HF pre-tokenizer that splits text the same way (for import),
# and whether the HF tokenizer normalises to NFC first.
PRE_TO_HF: dict[str, tuple[tuple, bool]] = {
    "gpt-2": ((("ByteLevel", True),), False),
    "default": ((("ByteLevel", True),), False),
    "smollm": ((("Digits", True), ("ByteLevel", True)), False),
    "starcoder": ((("Digits", True), ("ByteLevel", True)), False),
    "refact": ((("Digits", True), ("ByteLevel", True)), False),
    "codeshell": ((("Digits", True), ("ByteLevel", True)), False),
    "llama-bpe": ((("Split", LLAMA3_REGEX), ("ByteLevel", False)), False),
    "llama3": ((("Split", LLAMA3_REGEX), ("ByteLevel", False)), False),
    "llama-v3": ((("Split", LLAMA3_REGEX), ("ByteLevel", False)), False),
    "dbrx": ((("Split", LLAMA3_REGEX), ("ByteLevel", False)), False),
    "smaug-bpe": ((("Split", LLAMA3_REGEX), ("ByteLevel", False)), False),
    PRE_QWEN2: ((("Split", QWEN2_REGEX), ("ByteLevel", False)), True),
    "deepseek-r1-qwen": ((("Split", QWEN2_REGEX), ("ByteLevel", False)), True),
}
# Names llama.cpp (as vendored by llama-cpp-python 0.3.36) accepts for tokenizer.ggml.pre; an unknown
# name makes the file fail to load, so an explicit --pre is checked against this list.
LLAMA_CPP_PRE_NAMES = frozenset("""
default llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 deepseek-llm deepseek-coder
deepseek-v3 falcon mpt starcoder gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum
modern-bert jina-v1-en jina-v2-code roberta-bpe whitespace refact command-r qwen2 deepseek-r1-qwen
stablelm2 olmo dbrx smaug-bpe poro-chat chatglm-bpe glm4 viking jais tekken smollm codeshell bloom
gpt3-finnish exaone exaone4 chameleon minerva-7b megrez gpt-4o llama4 superbpe trillion bailingmoe
seed-coder hunyuan kimi-k2 grok-2
""".split())

# GGUF token types (llama.cpp)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

# pizoo's own keys (llama.cpp ignores keys it does not know)
KEY_ROPE = "pizoo.rope"  # JSON of the RopeConfig the file computes
KEY_ARCH = "pizoo.architecture"  # the family (pizoo.families), e.g. mistral in an arch-llama file
KEY_SLIDING = "pizoo.sliding_window"
KEY_SLIDING_LAYERS = "pizoo.sliding_window_layers"
KEY_BLOCK = "pizoo.config"  # JSON of the config.json `pizoo` block (lineage, target length)

def float32_value(x: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.99999974737875e-06)."""
    return float(str(np.float32(x)))


# --------------------------------------------------------------------------------------------
# RoPE: what to write


@dataclass
class RopeExport:
    """The RoPE part of a GGUF file: keys, RoPE tensors, and the RopeConfig it computes."""

    context_length: int
    freq_base: float
    scaling_type: str  # none | linear | yarn
    factor: float | None
    original_context: int | None
    attn_factor: float | None  # rope.scaling.attn_factor (None: default 1)
    tensors: dict[str, np.ndarray]  # ROPE_TENSORS name -> float32 [rotary dim/2] (frequency divisors)
    computes: RopeConfig  # what the file computes, in pizoo's terms (written to pizoo.rope)

    @property
    def needs_rope_freqs(self) -> bool:
        return ROPE_FREQS in self.tensors


def extended_length(cfg: ModelConfig) -> int:
    """The length the model is extended to: the recorded target, else max_position_embeddings, or
    original length x factor when a scaled config left max_position_embeddings at the old value."""
    target = (cfg.raw.get("pizoo") or {}).get("target_context")
    if target:
        return int(target)
    rope = cfg.rope
    if rope.is_scaled and rope.type != "dynamic" and rope.original_context and \
            cfg.max_position_embeddings <= rope.original_context and rope.factor > 1:
        return int(round(rope.original_context * rope.factor))
    return cfg.max_position_embeddings


def plan_rope(cfg: ModelConfig, static_length: int | None = None, where: str = "config.json") -> RopeExport:
    """Choose the faithful GGUF form of cfg's RoPE scaling (see the module docstring)."""
    rope, dim = cfg.rope, cfg.rope_dim
    method = rope.type
    if static_length is not None and method != "dynamic":
        raise PizooError(f"--static-length: only dynamic NTK models need a static length; {where} uses "
                         f"'{rope.method}' scaling, which GGUF stores as it is. Drop --static-length")
    ctx = extended_length(cfg)
    if method == "dynamic":
        if static_length is None:
            raise PizooError(
                f"{where}: dynamic NTK scaling recomputes RoPE for every sequence length and has no GGUF form "
                "(llama.cpp's RoPE is static); pass --static-length N to bake the scaling dynamic NTK uses at "
                "N tokens into rope_freqs, or extend the model with a static method (linear, yarn, ntk)")
        if static_length <= 0:
            raise PizooError(f"--static-length: must be a positive number of tokens, got {static_length}")
        ctx = int(static_length)
    if cfg.family.gguf.rope_factor_pair:
        return _plan_factor_pair(cfg, ctx)
    if method == "none":
        return RopeExport(ctx, rope.theta, "none", None, None, None, {}, rope)
    if method == "linear":
        return RopeExport(ctx, rope.theta, "linear", rope.factor, rope.original_context, None, {}, rope)
    if method == "ntk":
        return RopeExport(ctx, ntk_theta(rope.theta, rope.factor, dim), "none", None, rope.original_context,
                          None, {}, rope)
    if method == "yarn" and rope.beta_fast == 32.0 and rope.beta_slow == 1.0 and rope.truncate:
        from ..rope import yarn_attention_factor

        default = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
        wanted = yarn_attention_factor(rope)
        attn = None if math.isclose(wanted, default, rel_tol=1e-7) else wanted / default
        return RopeExport(ctx, rope.theta, "yarn", rope.factor, rope.original_context, attn, {}, rope)
    # Per-frequency: rope_freqs = base / scaled inverse frequencies, at the extended length.
    import torch

    from ..rope import frequency_factors, inv_freq_for

    factors = frequency_factors(rope, dim, ctx).to(torch.float32).numpy()
    _, attn = inv_freq_for(rope, dim, ctx)
    computes = rope
    if method == "dynamic":
        # What the file computes is a fixed per-frequency scaling: longrope with equal factor sets.
        ext = [float(x) for x in factors]
        computes = RopeConfig(type="longrope", theta=rope.theta, factor=ctx / rope.original_context,
                              original_context=rope.original_context, short_factor=ext, long_factor=list(ext),
                              attention_factor=1.0)
    # No rope.scaling.factor here: the scaling is all in rope_freqs, and llama.cpp (freq_scale_train)
    # and other GGUF readers take that key as a linear factor on top of it (llama.cpp's own converter
    # writes none for llama3 either).
    return RopeExport(ctx, rope.theta, "none", None, rope.original_context,
                      None if math.isclose(attn, 1.0, rel_tol=1e-7) else attn, {ROPE_FREQS: factors}, computes)


def _plan_factor_pair(cfg: ModelConfig, ctx: int) -> RopeExport:
    """LongRoPE's own GGUF form: the family's config form of the scaling (every method as short and
    long factors, pizoo.families.phi3) written as the two factor tensors."""
    rope = cfg.family.hf_rope(cfg.rope, cfg.rope_dim, ctx)
    if rope.type == "none":
        return RopeExport(ctx, rope.theta, "none", None, None, None, {}, rope)
    if rope.type != "longrope":
        raise RuntimeError(f"{cfg.family.model_type}.hf_rope gave '{rope.type}', not longrope")  # a family bug
    from ..rope import longrope_attention_factor

    attn = longrope_attention_factor(rope)
    pair = {ROPE_FACTORS_LONG: np.asarray(rope.long_factor, dtype=np.float32),
            ROPE_FACTORS_SHORT: np.asarray(rope.short_factor, dtype=np.float32)}
    return RopeExport(ctx, rope.theta, "none", None, rope.original_context,
                      None if math.isclose(attn, 1.0, rel_tol=1e-7) else attn, pair, rope)


# --------------------------------------------------------------------------------------------
# Tokenizer


def _token_content(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def pre_signature(spec: dict) -> tuple | None:
    """The canonical signature of a tokenizer.json pre-tokenizer (None: a step pizoo cannot name)."""
    pt = spec.get("pre_tokenizer")
    if not isinstance(pt, dict):
        return None
    steps = pt.get("pretokenizers") if pt.get("type") == "Sequence" else [pt]
    out = []
    for s in steps or []:
        kind = s.get("type")
        if kind == "ByteLevel":
            if s.get("add_prefix_space"):
                return None  # llama.cpp's byte-level pre-tokenizers never add a prefix space
            out.append(("ByteLevel", bool(s.get("use_regex", True))))
        elif kind == "Digits":
            out.append(("Digits", bool(s.get("individual_digits"))))
        elif kind == "Split":
            pattern = s.get("pattern") or {}
            if s.get("invert") or s.get("behavior") != "Isolated" or "Regex" not in pattern:
                return None
            out.append(("Split", pattern["Regex"]))
        else:
            return None
    return tuple(out)


# tokenizer.ggml.model values: SentencePiece-style BPE (llama.cpp calls it "llama", whatever the
# model family) and byte-level BPE.
TOKENIZER_SPM, TOKENIZER_BPE = "llama", "gpt2"

# Pre-tokenizers whose tokenizer.json carries an NFC normaliser that llama.cpp applies as well
# (the NFC flag of PRE_TO_HF).
NFC_PRE_TOKENIZERS = frozenset(name for name, (_, nfc) in PRE_TO_HF.items() if nfc)


def identify_pre(spec: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, when pizoo knows it."""
    sig = pre_signature(spec)
    name = PRE_SIGNATURES.get(sig) if sig is not None else None
    norm = spec.get("normalizer")
    if name is None:
        return None
    if norm is not None and not (name in NFC_PRE_TOKENIZERS and norm.get("type") == "NFC"):
        return None  # a normaliser llama.cpp does not apply would change the tokens
    return name


def _is_sentencepiece_style(spec: dict) -> bool:
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return False
    text = json.dumps(spec.get("pre_tokenizer") or {}, ensure_ascii=False) + json.dumps(spec.get("normalizer") or {},
                                                                                     ensure_ascii=False)
    return bool(model.get("byte_fallback")) or "Metaspace" in text or "\u2581" in text


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    pairs = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            a, _, b = m.partition(" ")
            pairs.append((a, b))
        else:
            pairs.append((m[0], m[1]))
    return pairs


def _space_prefix(spec: dict) -> bool:
    """Whether the SentencePiece-style tokenizer prepends '▁' to the text (llama.cpp add_space_prefix)."""
    norm = json.dumps(spec.get("normalizer") or {}, ensure_ascii=False)
    if '"Prepend"' in norm and "\u2581" in norm:
        return True
    pt = spec.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers") if pt.get("type") == "Sequence" else [pt]
    for s in steps or []:
        if s.get("type") == "Metaspace":
            return s.get("prepend_scheme", "always" if s.get("add_prefix_space", True) else "never") != "never"
    return False


def _post_adds(spec: dict, token_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor adds `token_id` to a single sequence."""
    if token_id is None:
        return False
    post = spec.get("post_processor") or {}
    procs = post.get("processors") if post.get("type") == "Sequence" else [post]
    for p in procs or []:
        if p.get("type") == "TemplateProcessing":
            for item in p.get("single") or []:
                tok = (item.get("SpecialToken") or {}).get("id")
                if tok is not None and token_id in ((p.get("special_tokens") or {}).get(tok) or {}).get("ids", []):
                    return True
    return False


def tokenizer_metadata(folder: Path, cfg: ModelConfig, pre: str | None = None) -> dict[str, Any]:
    """tokenizer.ggml.* keys (and tokenizer.chat_template) for the folder's tokenizer."""
    from ..fsutil import read_json

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise PizooError(f"{folder}: no tokenizer.json; llama.cpp needs the vocabulary inside the GGUF. Add the "
                         "fast-tokenizer file (tokenizer.json) to the model folder")
    spec = read_json(tj, "tokenizer.json")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise PizooError(f"{tj}: tokenizer model '{model.get('type')}' is not supported for GGUF; pizoo writes "
                         "byte-level BPE (gpt2) and SentencePiece-style BPE (llama) vocabularies")
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = read_json(tcfg_path, "tokenizer_config.json") if tcfg_path.is_file() else {}
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in spec.get("added_tokens") or []}
    for content, a in added.items():
        vocab[content] = a["id"]
    n_tok = max(vocab.values()) + 1 if vocab else 0
    if n_tok > cfg.vocab_size:
        raise PizooError(f"{tj}: the tokenizer has {n_tok} tokens but config.json vocab_size is {cfg.vocab_size}; "
                         "the embedding matrix has no row for the extra tokens")
    sentencepiece = _is_sentencepiece_style(spec)
    tokens: list[str | None] = [None] * cfg.vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    unk = model.get("unk_token")
    types = []
    for i, text in enumerate(tokens):
        # Byte-fallback pieces are BYTE even when tokenizer.json lists them as added tokens:
        # llama.cpp decodes only BYTE pieces to raw bytes.
        if text is None:
            types.append(TOKEN_UNUSED)
        elif sentencepiece and _BYTE_TOKEN.match(text):
            types.append(TOKEN_BYTE)
        elif sentencepiece and text == unk:
            types.append(TOKEN_UNKNOWN)
        elif text in added:
            types.append(TOKEN_CONTROL if added[text].get("special") else TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)
    # Rows the tokenizer does not use (embedding padding) get placeholder names llama.cpp accepts.
    token_list = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    meta: dict[str, Any] = {"tokenizer.ggml.tokens": token_list, "tokenizer.ggml.token_type": types}
    merges = _merge_pairs(model)
    if sentencepiece:
        meta["tokenizer.ggml.model"] = TOKENIZER_SPM
        # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores
        # highest; scoring each piece by minus the rank of the merge that creates it reproduces the
        # BPE merge order. Pieces no merge creates (characters, bytes, specials) score 0.
        rank: dict[str, int] = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        meta["tokenizer.ggml.scores"] = [float(-rank[t] - 1) if t in rank else 0.0 for t in token_list]
        meta["tokenizer.ggml.add_space_prefix"] = _space_prefix(spec)
    else:
        meta["tokenizer.ggml.model"] = TOKENIZER_BPE
        name = pre or identify_pre(spec)
        if name is None:
            raise PizooError(
                f"{tj}: pizoo cannot identify this BPE pre-tokenizer for llama.cpp (pre_tokenizer "
                f"{json.dumps(spec.get('pre_tokenizer'))[:120]}); pass --pre NAME with the llama.cpp name that "
                "splits text the same way (e.g. gpt-2, llama-bpe, qwen2, smollm)")
        if name not in LLAMA_CPP_PRE_NAMES:
            raise PizooError(f"--pre: '{name}' is not a pre-tokenizer llama.cpp knows (the file would not load); "
                             f"use one of {', '.join(sorted(LLAMA_CPP_PRE_NAMES))}")
        meta["tokenizer.ggml.pre"] = name
        meta["tokenizer.ggml.merges"] = [f"{a} {b}" for a, b in merges]
    # Special tokens: tokenizer_config.json names them; config.json ids are the fallback.
    def token_id(key: str) -> int | None:
        content = _token_content(tcfg.get(key))
        return vocab.get(content) if content is not None else None

    bos = token_id("bos_token")
    eos = token_id("eos_token")
    if bos is None and cfg.bos_token_id is not None:
        bos = int(cfg.bos_token_id)
    if eos is None and cfg.eos_token_id is not None:
        eos = int(cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id)
    ids = {"bos": bos, "eos": eos, "unknown": token_id("unk_token") if token_id("unk_token") is not None
           else (vocab.get(unk) if unk else None), "padding": token_id("pad_token")}
    for key, tid in ids.items():
        if tid is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(tid)
    add_bos = tcfg.get("add_bos_token")
    add_eos = tcfg.get("add_eos_token")
    meta["tokenizer.ggml.add_bos_token"] = bool(add_bos) if add_bos is not None else _post_adds(spec, bos)
    meta["tokenizer.ggml.add_eos_token"] = bool(add_eos) if add_eos is not None else _post_adds(spec, eos)
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp takes the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


# --------------------------------------------------------------------------------------------
# Lineage and file name


def size_label(n_params: int) -> str:
    """Hub-style size label: 135M, 1.1B, 7B, 98K."""
    if n_params >= 1e9:
        return f"{n_params / 1e9:.1f}".rstrip("0").rstrip(".") + "B"
    if n_params >= 1e6:
        return f"{round(n_params / 1e6)}M"
    return f"{round(n_params / 1e3)}K"


METHOD_LABELS = {"linear": "pi", "ntk": "ntk", "dynamic": "dynamic-ntk", "yarn": "yarn", "llama3": "llama3",
                 "longrope": "longrope", "clex": "clex"}


def context_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def lineage(src: Path, cfg: ModelConfig) -> dict[str, Any]:
    """general.* facts from the model's public identity (pizoo.lineage): basename and size label,
    finetune (Instruct-32k-pi), the base model's public name, organization and repo URL, the license.
    A base with no public identity is not listed (never a path); its folder's name names the file."""
    ident = model_identity(cfg.raw, src)
    size = size_label(cfg.num_params())
    basename, rest = split_size(ident.file_name, size)
    out: dict[str, Any] = {"basename": basename, "size_label": size, "identity": ident}
    finetune = [rest] if rest else []
    if cfg.rope.is_scaled:
        method = cfg.rope.method
        finetune.append(f"{context_label(extended_length(cfg))}-{METHOD_LABELS.get(method, method)}")
        if ident.public:
            entry = {"name": ident.name or ident.label, "organization": ident.organization, "repo_url": ident.repo_url}
            out["base_models"] = [{k: v for k, v in entry.items() if v}]
    elif ident.hub_id:
        out["source_repo"] = ident.hub_id
    if finetune:
        out["finetune"] = "-".join(finetune)
    if ident.license:
        out["license"] = ident.license
    return out


def general_name(lin: dict[str, Any]) -> str:
    """general.name: basename, size label and finetune (e.g. 'SmolLM2 135M 32k-pi')."""
    return " ".join(p for p in (lin["basename"], lin["size_label"], lin.get("finetune")) if p)


def refuse_unloadable_name(name: str, tokens: list[str], where: str) -> None:
    """A general.name llama.cpp would apply a family's vocabulary rule to (Family.gguf_name_rule) that
    this vocabulary cannot take."""
    present = set(tokens)
    for fam in FAMILIES.values():
        if fam.gguf_name_rule is None:
            continue
        markers, needed = fam.gguf_name_rule
        missing = [t for t in needed if t not in present]
        if missing and any(m in name.lower() for m in markers):
            raise PizooError(
                f"{where}: the GGUF name '{name}' makes llama.cpp apply its {fam.model_type} vocabulary rule, which needs the "
                f"token {missing[0]!r} this tokenizer lacks, so llama.cpp could not load the file; rename the model "
                f"folder (or its _name_or_path) so its name does not contain {' or '.join(repr(m) for m in markers)}")


def default_file_name(src: Path, cfg: ModelConfig, dtype: str, static_length: int | None = None) -> str:
    """The artifact's one name, locally and on the Hub: the base's public name, the context and method,
    the type: SmolLM2-135M-Instruct-32K-PI-F16.gguf (pizoo.lineage.artifact_stem)."""
    ident = model_identity(cfg.raw, src)
    extension = []
    if cfg.rope.is_scaled:
        ctx = static_length if cfg.rope.type == "dynamic" and static_length else extended_length(cfg)
        extension += [context_label(ctx).upper(), METHOD_LABELS.get(cfg.rope.method, cfg.rope.method).upper()]
    extension.append(dtype.upper())
    return artifact_stem(ident, extension) + ".gguf"


# --------------------------------------------------------------------------------------------
# Reading the source folder without torch
#
# The export reads raw safetensors bytes with os.preadv into numpy buffers, so it never imports torch
# (about 220 MiB of resident memory) unless a per-frequency RoPE table must be computed, and never
# maps the source files (whose touched pages would count as the process's resident memory).

_ST_FLOAT = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


# --------------------------------------------------------------------------------------------
# Conversions (numpy; every op on a whole chunk releases the GIL, so worker threads run in parallel)


_Q8_HALF_BITS = np.uint32(np.float32(np.nextafter(np.float32(0.5), np.float32(0))).view(np.uint32))  # 0.49999997


def _fresh(key: int, n: int, dtype) -> np.ndarray:
    """The default temporary allocator: a new array (the pipeline passes per-thread scratch instead)."""
    return np.empty(n, dtype=dtype)


def _block_absmax_bits(abits: np.ndarray, tmp=_fresh) -> np.ndarray:
    """Per 32-element block maximum of non-negative integers `abits` (float32 |x| bit patterns, whose
    integer order is the float order), by halving along the flat array: every step is one long
    strided loop, where a reduction over rows of 32 pays numpy's per-row overhead. Pairs never
    straddle blocks (blocks start at multiples of 32)."""
    n = abits.size
    ping, pong = tmp(10, n // 2, np.uint32), tmp(11, n // 4, np.uint32)
    m, size = abits, n
    for step in range(5):
        size //= 2
        dst = (ping if step % 2 == 0 else pong)[:size]
        np.maximum(m[0::2], m[1::2], out=dst)
        m = dst
    return m


def _quantize_q8_0_f32(x: np.ndarray, out: np.ndarray | None = None, tmp=_fresh) -> np.ndarray:
    """Q8_0 blocks of float32 `x` (any shape, size % 32 == 0; modified in place) as uint8 [blocks, 34].

    Bit-identical to ggml's reference quantiser: d = absmax/127 (float32) stored as float16, values
    x * (1/d) rounded half away from zero. The rounding adds the float32 just below 0.5 (with y's
    sign) and truncates: exact for every |y| <= 128 (checked over every float32 in [0, 128]; the tests
    check the values near each half-integer), where floor(|y| + 0.5) would round 0.49999997 up."""
    flat = x.reshape(-1)
    n = flat.size
    bits = flat.view(np.uint32)
    work = tmp(12, n, np.uint32)
    np.bitwise_and(bits, np.uint32(0x7FFFFFFF), out=work)
    amax = _block_absmax_bits(work, tmp).view(np.float32)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    blocks = flat.reshape(-1, QUANT_BLOCK)
    blocks *= inv[:, None]
    np.bitwise_and(bits, np.uint32(0x80000000), out=work)  # y's sign, on the float32 below 0.5
    work |= _Q8_HALF_BITS
    flat += work.view(np.float32)
    if out is None:
        out = np.empty((blocks.shape[0], Q8_0_BLOCK_BYTES), dtype=np.uint8)
    out = out.reshape(blocks.shape[0], Q8_0_BLOCK_BYTES)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    np.copyto(out[:, 2:].view(np.int8), blocks, casting="unsafe")  # float -> int8 truncates toward zero
    return out


def quantize_q8_0(x):
    """Q8_0 blocks of `x` [rows, cols] (cols % 32 == 0) as uint8 [rows, cols/32*34], byte-identical to
    ggml's reference quantiser. Takes and returns numpy arrays, or torch tensors."""
    if not isinstance(x, np.ndarray):  # a torch tensor
        import torch

        return torch.from_numpy(quantize_q8_0(x.detach().to(torch.float32).cpu().numpy()))
    rows, cols = x.shape
    return _quantize_q8_0_f32(np.array(x, dtype=np.float32)).reshape(rows, cols // QUANT_BLOCK * Q8_0_BLOCK_BYTES)


def _bf16_to_f32(u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        out = np.empty(u.shape, dtype=np.uint32)
    np.left_shift(u, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out.view(np.float32)


class _F16Overflow(Exception):
    """A finite value beyond float16's range (the caller names the tensor)."""


def _bf16_to_f16(u: np.ndarray, out: np.ndarray | None = None, tmp=_fresh) -> np.ndarray:
    """bfloat16 bits -> float16 bits, exactly as float32 -> float16 rounding (numpy's astype) would.

    Every bfloat16 whose exponent is in float16's normal range converts exactly by moving the exponent
    and widening the mantissa (7 -> 10 bits), in three integer ops. The rest (zero, float16 subnormals,
    beyond 65504, inf, nan) go through float32 -> float16 rounding."""
    u = u.reshape(-1)
    n = u.size
    res = np.empty(n, np.uint16) if out is None else out.reshape(-1).view(np.uint16)
    mag, sign = tmp(20, n, np.uint16), tmp(21, n, np.uint16)
    np.bitwise_and(u, np.uint16(0x7FFF), out=mag)
    np.subtract(mag, np.uint16(0x3800), out=res)  # exponent bias 127 -> 15 (low 7 bits: the mantissa)
    res <<= 3
    np.bitwise_and(u, np.uint16(0x8000), out=sign)
    res |= sign
    mag -= np.uint16(0x3880)  # wraps: only magnitudes in [2^-14, 65536) stay below the range
    special = tmp(22, n, np.bool_)
    np.greater_equal(mag, np.uint16(0x4780 - 0x3880), out=special)
    if special.any():
        idx = np.flatnonzero(special)
        src = _bf16_to_f32(u[idx])
        with np.errstate(over="ignore"):
            conv = src.astype(np.float16)
        if np.isinf(conv).any() and (np.isinf(conv) & np.isfinite(src)).any():
            raise _F16Overflow
        res[idx] = conv.view(np.uint16)
    return res.view(np.float16)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (nan stays a quiet nan)."""
    bits = x.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = (bits[nan] >> 16) | np.uint32(0x40)
    return rounded.astype(np.uint16)


def _convert(raw: np.ndarray, src_dtype: str, out_type: str, out: np.ndarray | None = None,
             tmp=_fresh) -> np.ndarray:
    """Source elements (raw safetensors values, bf16 as uint16 bits; the caller's buffer, which may be
    changed) -> the output type's bytes, in `out` (a uint8 buffer large enough) when given."""
    n = raw.size

    def dest(dtype) -> np.ndarray:
        return np.empty(n, dtype) if out is None else out[:n * np.dtype(dtype).itemsize].view(dtype)

    same = {("BF16", "bf16"), ("F16", "f16"), ("F32", "f32")}
    if (src_dtype, out_type) in same:
        if out is None:
            return raw
        d = dest(raw.dtype)
        np.copyto(d, raw.reshape(-1))
        return d
    if src_dtype == "BF16" and out_type == "f16":
        return _bf16_to_f16(raw, dest(np.uint16), tmp)
    if src_dtype == "BF16":
        x = _bf16_to_f32(raw, dest(np.float32) if out_type == "f32" else tmp(30, n, np.float32))
    elif out_type == "f32":
        x = dest(np.float32)
        np.copyto(x, raw.reshape(-1), casting="unsafe")
    else:
        x = tmp(30, n, np.float32)
        np.copyto(x, raw.reshape(-1), casting="unsafe")
    if out_type == "f32":
        return x
    if out_type == "f16":
        h = dest(np.float16)
        with np.errstate(over="ignore"):
            np.copyto(h, x, casting="unsafe")
        inf = np.isinf(h)
        if inf.any() and (inf & np.isfinite(x)).any():
            raise _F16Overflow
        return h
    if out_type == "bf16":
        h = dest(np.uint16)
        np.copyto(h, _f32_to_bf16(x))
        return h
    q = None if out is None else out[:n // QUANT_BLOCK * Q8_0_BLOCK_BYTES]
    return _quantize_q8_0_f32(x, q, tmp).reshape(-1)


# --------------------------------------------------------------------------------------------
# Tensor plan and the data pipeline

# Elements per pipeline chunk (1 MiB of bf16 input: a chunk's temporaries stay in cache; 4x larger
# chunks measured slower); CHUNKS_IN_FLIGHT converted chunks wait for the writer at most, so buffers
# stay at a few tens of MiB whatever the model size.
CHUNK_ELEMENTS = 1 << 19
CHUNKS_IN_FLIGHT = 6
# The writer asks the kernel to write back the output every SYNC_EVERY bytes (an fdatasync in its own
# thread), so writeback overlaps conversion and the final fsync before the rename is short.
SYNC_EVERY = 128 << 20


@dataclass
class _Job:
    """One GGUF tensor: where its data comes from and how it is converted."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # logical shape, HF order (rows, cols)
    out_type: str  # f32 | f16 | bf16 | q8_0
    nbytes: int
    file: Path | None = None  # source safetensors file (None: `array` holds the data)
    offset: int = 0
    src_dtype: str = "F32"  # safetensors dtype name
    heads: int | None = None  # permute q/k rows with this many heads
    array: np.ndarray | None = None
    offset_add: float = 0.0  # added to every value (Tensor.gguf_offset: Gemma's 1 + w norms)
    qkv_heads: int | None = None  # rows per head [q_h|k_h|v_h] -> Q|K|V blocks over this many heads
    src_name: str = ""  # HF name (for messages)


_OUT_ELEM = {"f32": 4, "f16": 2, "bf16": 2}


def _out_nbytes(shape: tuple[int, ...], out_type: str) -> int:
    n = math.prod(shape)
    if out_type == "q8_0":
        return n // QUANT_BLOCK * Q8_0_BLOCK_BYTES
    return n * _OUT_ELEM[out_type]


def _ggml_type(out_type: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]


class _SourceFiles:
    """The source safetensors files, opened once each; chunks are read with os.preadv (thread-safe,
    GIL released) into the caller's buffer."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}
        self.lock = threading.Lock()

    def read(self, path: Path, offset: int, into: np.ndarray) -> np.ndarray:
        with self.lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            fd = self.fds[path]
        view = memoryview(into).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise PizooError(f"{path}: ended early (truncated while being read?); re-download or re-export it")
            done += n
        return into

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _Scratch(threading.local):
    """Per-thread temporaries, kept between chunks: reusing them avoids the page faults (system time)
    of fresh multi-MiB allocations, which glibc returns to the kernel on every free."""

    def __init__(self) -> None:
        self.bufs: dict[int, np.ndarray] = {}

    def __call__(self, key: int, n: int, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        need = n * dtype.itemsize
        buf = self.bufs.get(key)
        if buf is None or buf.nbytes < need:
            buf = self.bufs[key] = np.empty(need, dtype=np.uint8)
        return buf[:need].view(dtype)


class _OutputBuffers:
    """A fixed set of output buffers that circulate between the workers and the writer (fresh ones
    would page-fault, see _Scratch). Closing wakes every waiting worker with None."""

    def __init__(self, count: int, nbytes: int) -> None:
        import queue

        self.free: "queue.Queue[np.ndarray | None]" = queue.Queue()
        for _ in range(count):
            self.free.put(np.empty(nbytes, dtype=np.uint8))

    def get(self) -> np.ndarray | None:
        return self.free.get()

    def put(self, buf: np.ndarray | None) -> None:
        self.free.put(buf)


class _Cancelled(Exception):
    pass


def _chunk_rows(job: _Job) -> list[tuple[int, int]]:
    """Row ranges of one tensor's pipeline chunks (whole heads for permuted q/k)."""
    if job.array is not None or len(job.shape) == 1:
        return [(0, job.shape[0])]
    rows, row_elems = job.shape[0], math.prod(job.shape[1:])
    # the q/k permutation needs whole heads; the q/k/v regrouping reads whole head rows
    align = rows // job.heads if job.heads else rows // (3 * job.qkv_heads) if job.qkv_heads else 1
    step = max(align, (CHUNK_ELEMENTS // row_elems) // align * align)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _chunk_out_bytes(job: _Job, r0: int, r1: int) -> int:
    return _out_nbytes((r1 - r0,) + tuple(job.shape[1:]), job.out_type)


def _convert_chunk(job: _Job, r0: int, r1: int, files: _SourceFiles, scratch: _Scratch,
                   out: np.ndarray) -> np.ndarray:
    """Rows [r0, r1) of a tensor: read, q/k permuted, converted to the output type's bytes in `out`."""
    try:
        if job.array is not None:
            return _convert(job.array.astype(np.float32), "F32", job.out_type, out, scratch)
        dtype = _ST_FLOAT[job.src_dtype]
        row_elems = math.prod(job.shape[1:]) if len(job.shape) > 1 else 1
        n = (r1 - r0) * row_elems
        if job.qkv_heads:
            raw = _read_qkv_blocks(job, r0, r1, row_elems, files, scratch(1, n, dtype))
        else:
            raw = files.read(job.file, job.offset + r0 * row_elems * dtype.itemsize, scratch(1, n, dtype))
        if job.heads:
            # HF 'rotate halves' rows -> llama.cpp's adjacent pairs (permute_rows), copied in one pass
            heads = (r1 - r0) // (job.shape[0] // job.heads)
            half = (r1 - r0) // heads // 2
            dst = scratch(2, n, dtype)
            np.copyto(dst.reshape(heads, half, 2, row_elems),
                      raw.reshape(heads, 2, half, row_elems).swapaxes(1, 2))
            raw = dst
        if job.offset_add:
            values = _bf16_to_f32(raw) if job.src_dtype == "BF16" else raw.astype(np.float32)
            return _convert(values + np.float32(job.offset_add), "F32", job.out_type, out, scratch)
        return _convert(raw, job.src_dtype, job.out_type, out, scratch)
    except _F16Overflow:
        raise PizooError(f"{job.file}: tensor '{job.src_name}' has values beyond float16's range (+-65504) that "
                         "would become inf; export with --dtype bf16, f32 or q8_0") from None


def _read_qkv_blocks(job: _Job, r0: int, r1: int, row_elems: int, files: _SourceFiles,
                     into: np.ndarray) -> np.ndarray:
    """Rows [r0, r1) of the Q|K|V-block layout (families.qkv_blocks) read from the per-head source
    layout [n_head, 3, head_dim, ...]: each head_dim run of output rows is one run of source rows."""
    hd = job.shape[0] // (3 * job.qkv_heads)
    per = hd * row_elems
    for k, block in enumerate(range(r0 // hd, r1 // hd)):
        part, head = divmod(block, job.qkv_heads)  # block = part * n_head + head in the output
        source_row = (head * 3 + part) * hd
        files.read(job.file, job.offset + source_row * row_elems * into.itemsize, into[k * per:(k + 1) * per])
    return into


def _plan_tensors(src_tensors: dict[str, TensorInfo], cfg: ModelConfig, dtype: str, permute: bool,
                  rope_tensors: dict[str, np.ndarray]) -> list[_Job]:
    jobs: list[_Job] = []
    table = {t.hf: t for t in cfg.tensor_table()}
    infos = sorted(src_tensors.values(), key=lambda t: (str(t.file), t.offset))
    for info in infos:
        entry = table.get(info.name)
        if entry is None or entry.gguf is None:
            # rotary_emb.inv_freq and the like (recomputed by llama.cpp), or a stored tied head
            # (llama.cpp reuses token_embd)
            continue
        gname = entry.gguf
        if info.dtype not in _ST_FLOAT:
            raise PizooError(f"{info.file}: tensor '{info.name}' has dtype {info.dtype}; GGUF export reads "
                             "float tensors")
        shape = tuple(info.shape)
        if len(shape) == 1:
            out = "f32"  # norms and biases stay float32 (llama.cpp adds/multiplies them in f32)
        elif dtype == "q8_0" and shape[-1] % QUANT_BLOCK:
            out = "f16"  # Q8_0 needs rows in whole 32-element blocks
        else:
            out = dtype
        heads = None
        if permute and entry.rotary:
            heads = cfg.num_heads if entry.rotary == "q" else cfg.num_kv_heads
        jobs.append(_Job(gname, shape, out, _out_nbytes(shape, out), info.file, info.offset, info.dtype, heads,
                         src_name=info.name, offset_add=entry.gguf_offset,
                         qkv_heads=cfg.num_heads if entry.qkv_per_head else None))
    for name, values in rope_tensors.items():
        jobs.append(_Job(name, tuple(values.shape), "f32", values.nbytes, array=values.astype(np.float32),
                         src_name=name.removesuffix(".weight")))
    return jobs


def _converted_chunks(jobs: list[_Job], files: _SourceFiles,
                     workers: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, _OutputBuffers]]:
    """(job index, converted chunk, its buffer, the buffer set) in file order, read and converted by
    `workers` threads, at most CHUNKS_IN_FLIGHT chunks ahead of the caller, who writes each chunk and
    then returns its buffer to the set (buffers.put) before asking for the next."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    chunks = [(i, r0, r1) for i, job in enumerate(jobs) for r0, r1 in _chunk_rows(job)]
    size = max((_chunk_out_bytes(jobs[i], r0, r1) for i, r0, r1 in chunks), default=0)
    buffers = _OutputBuffers(CHUNKS_IN_FLIGHT + 1, size)  # every pending chunk and the one being written
    scratch = _Scratch()

    def work(i: int, r0: int, r1: int):
        out = buffers.get()
        if out is None:
            raise _Cancelled
        try:
            return _convert_chunk(jobs[i], r0, r1, files, scratch, out), out
        except BaseException:
            buffers.put(out)
            raise

    pending: deque = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pizoo-gguf")
    try:
        for i, r0, r1 in chunks:
            pending.append((i, pool.submit(work, i, r0, r1)))
            if len(pending) >= CHUNKS_IN_FLIGHT:
                j, fut = pending.popleft()
                yield (j, *fut.result(), buffers)
        while pending:
            j, fut = pending.popleft()
            yield (j, *fut.result(), buffers)
    finally:
        for _, fut in pending:
            fut.cancel()
        for _ in range(workers):
            buffers.put(None)  # wakes a worker waiting for a buffer the writer will not return
        pool.shutdown(wait=True, cancel_futures=True)


class _Writeback:
    """Background fdatasync of the file being written, every SYNC_EVERY bytes: the kernel writes the
    data out while later chunks are converted, instead of all at the final fsync."""

    def __init__(self, fd: int, every: int = SYNC_EVERY) -> None:
        self.fd, self.every, self.pending = fd, every, 0
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="pizoo-gguf-sync", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.stopping:
                return
            try:
                os.fdatasync(self.fd)
            except OSError:
                return  # the final fsync reports the error

    def wrote(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.every:
            self.pending = 0
            self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join()


# --------------------------------------------------------------------------------------------
# Export


def _resolve_out(src: Path, out: str | os.PathLike | None, cfg: ModelConfig, dtype: str,
                 static_length: int | None) -> Path:
    name = default_file_name(src, cfg, dtype, static_length)
    if out is None:
        return src.resolve().parent / name
    out = Path(out)
    if out.is_dir():
        return out / name
    return out


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the export like Ctrl-C (KeyboardInterrupt): the temporary file is removed and the
    CLI exits 130. Only where SIGTERM has its default action and only in the main thread."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def export_gguf(src: str | os.PathLike, out: str | os.PathLike | None = None, *, dtype: str = "f16",
                pre: str | None = None, static_length: int | None = None, overwrite: bool = False,
                progress: bool = False) -> Path:
    """Write an HF folder as one llama.cpp-ready GGUF file with its RoPE scaling inside.

    dtype: f32 | f16 | bf16 | q8_0 for matrices (1-D tensors are always f32). pre: llama.cpp
    pre-tokenizer name for a byte-level BPE tokenizer pizoo cannot identify. static_length: bake a
    dynamic NTK model's scaling at this length. Returns the file's path (default: the Hub-style
    name beside the source folder). Written atomically (fsutil.atomic_path): a temporary file,
    fsynced, renamed when complete; SIGTERM and Ctrl-C remove it, and a killed export's leftover is
    removed by the next export to the same file.
    """
    from gguf import GGUFWriter

    from ..fsutil import atomic_path, check_output, output_lock

    src = Path(src)
    if dtype not in GGUF_DTYPES:
        raise PizooError(f"--dtype: '{dtype}' is not a GGUF export type; use one of {', '.join(GGUF_DTYPES)}")
    # The folder index is torch-free (pizoo.hf_folder), so a plain export never imports torch.
    cfg, _raw, src_tensors = index_hf_folder(src)
    where = str(src / "config.json")
    rope = plan_rope(cfg, static_length, where)
    tok_meta = tokenizer_metadata(src, cfg, pre)
    lin = lineage(src, cfg)
    refuse_unloadable_name(general_name(lin), tok_meta["tokenizer.ggml.tokens"], where)
    path = check_output(_resolve_out(src, out, cfg, dtype, static_length), overwrite=overwrite, inputs=[src],
                        folder=False)
    # A family whose llama.cpp graph has no rope_freqs input goes out as its fallback architecture
    # (Qwen2: llama), or is refused.
    garch = cfg.family.gguf_arch(cfg, rope.needs_rope_freqs, where)
    arch = garch.name
    if (cfg.sliding_window is not None and cfg.sliding_window_layers and cfg.sliding_window < rope.context_length
            and not garch.sliding_window):
        log.warning("%s: sliding_window=%d is shorter than the context (%d); llama.cpp's %s graph attends to the "
                    "whole context, so outputs differ past the window", where, cfg.sliding_window,
                    rope.context_length, arch)
    jobs = _plan_tensors(src_tensors, cfg, dtype, permute=garch.permute_qk, rope_tensors=rope.tensors)
    files = _SourceFiles()
    with output_lock(path), _sigterm_as_interrupt(), atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        try:
            _write_metadata(writer, arch, cfg, rope, tok_meta, dtype, lin)
            for job in jobs:
                writer.add_tensor_info(job.name, job.shape, np.dtype(np.float32), job.nbytes,
                                       raw_dtype=_ggml_type(job.out_type))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_data(writer, jobs, files, progress)
        finally:
            writer.close()  # atomic_path fsyncs and renames only after the body succeeded
            files.close()
    return path


def _write_data(writer, jobs: list[_Job], files: _SourceFiles, progress: bool) -> None:
    from tqdm.auto import tqdm

    fout = writer.fout[0]
    align = writer.data_alignment
    fout.write(b"\0" * (-fout.tell() % align))
    fout.flush()
    fd = fout.fileno()
    written = [0] * len(jobs)
    bar = tqdm(total=sum(j.nbytes for j in jobs), unit="B", unit_scale=True, desc="writing GGUF",
               disable=not progress, leave=False)
    sync = _Writeback(fd)
    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for i, data, buf, buffers in _converted_chunks(jobs, files, workers=max(1, min(4, cores))):
            view = memoryview(data).cast("B")
            while view:  # os.write releases the GIL; the file object's buffer is bypassed (flushed above)
                view = view[os.write(fd, view):]
            written[i] += data.nbytes
            buffers.put(buf)  # `data` lives in `buf`: not touched after this
            if written[i] == jobs[i].nbytes and jobs[i].nbytes % align:
                pad = -jobs[i].nbytes % align
                os.write(fd, b"\0" * pad)
            bar.update(data.nbytes)
            sync.wrote(data.nbytes)
    finally:
        sync.stop()
        bar.close()
    bad = [j.name for j, w in zip(jobs, written) if w != j.nbytes]
    if bad:
        raise PizooError(f"GGUF export wrote the wrong number of bytes for '{bad[0]}'; this is a pizoo bug")


def _write_metadata(w, arch: str, cfg: ModelConfig, rope: RopeExport, tok: dict[str, Any], dtype: str,
                    lin: dict[str, Any]) -> None:
    from gguf import GGUFValueType

    w.add_type("model")
    w.add_name(general_name(lin))
    w.add_basename(lin["basename"])
    w.add_size_label(lin["size_label"])
    if lin.get("finetune"):
        w.add_finetune(lin["finetune"])
    if lin.get("license"):
        w.add_string("general.license", lin["license"])
    if lin.get("source_repo"):
        w.add_string("general.source.huggingface.repository", lin["source_repo"])
    bases = lin.get("base_models") or []
    if bases:
        w.add_base_model_count(len(bases))
        for i, b in enumerate(bases):
            w.add_base_model_name(i, b["name"])
            if "organization" in b:
                w.add_base_model_organization(i, b["organization"])
            if "repo_url" in b:
                w.add_base_model_repo_url(i, b["repo_url"])
    w.add_file_type(FILE_TYPES[dtype])
    w.add_quantization_version(2)
    a = arch
    w.add_uint32(f"{a}.context_length", rope.context_length)
    w.add_uint32(f"{a}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{a}.block_count", cfg.num_layers)
    w.add_uint32(f"{a}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{a}.attention.head_count", cfg.num_heads)
    w.add_uint32(f"{a}.attention.head_count_kv", cfg.num_kv_heads)
    w.add_uint32(f"{a}.attention.key_length", cfg.head_dim)
    w.add_uint32(f"{a}.attention.value_length", cfg.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_uint32(f"{a}.rope.dimension_count", cfg.rope_dim)
    w.add_float32(f"{a}.rope.freq_base", rope.freq_base)
    w.add_uint32(f"{a}.vocab_size", cfg.vocab_size)
    w.add_string(f"{a}.rope.scaling.type", rope.scaling_type)
    if rope.factor is not None:
        w.add_float32(f"{a}.rope.scaling.factor", rope.factor)
    if rope.original_context is not None:
        w.add_uint32(f"{a}.rope.scaling.original_context_length", rope.original_context)
    if rope.attn_factor is not None:
        w.add_float32(f"{a}.rope.scaling.attn_factor", rope.attn_factor)
    if cfg.rope.is_scaled:
        w.add_bool(f"{a}.rope.scaling.finetuned", bool((cfg.raw.get("pizoo") or {}).get("target_context")))
    # pizoo's own record, so import restores exactly what was exported
    w.add_string(KEY_ARCH, cfg.architecture)
    w.add_string(KEY_ROPE, json.dumps(rope_to_dict(rope.computes)))
    for key, value in cfg.family.gguf_keys(cfg).items():
        _add_scalar(w, key, value)
    if cfg.sliding_window is not None:
        w.add_uint32(KEY_SLIDING, cfg.sliding_window)
        w.add_array(KEY_SLIDING_LAYERS, [int(x) for x in cfg.sliding_window_layers])
    # Always written (an empty block too): its presence tells import the file is pizoo's own.
    w.add_string(KEY_BLOCK, json.dumps(cfg.raw.get("pizoo") or {}))
    for key, value in tok.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            w.add_array(key, value)
        elif key == "tokenizer.ggml.token_type":
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        elif key == "tokenizer.ggml.scores":
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
        else:
            _add_scalar(w, key, value)


def _add_scalar(w, key: str, value: bool | int | float | str | list) -> None:
    if isinstance(value, list):
        w.add_array(key, value)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_string(key, value)


# --------------------------------------------------------------------------------------------
# `pizoo inspect FILE.gguf`


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def open_gguf(path: Path):
    """A GGUFReader, with a corrupt or truncated file reported as a PizooError naming it."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PizooError(f"{path}: not a readable GGUF file ({why}); re-download or re-export it") from None


def field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def describe_gguf(path: Path) -> dict[str, Any]:
    """inspect's stable keys for a GGUF file, plus rope keys, tensor types, tokenizer and lineage."""
    reader = open_gguf(path)
    arch = field(reader, "general.architecture")
    p = f"{arch}."
    recorded = field(reader, KEY_ROPE)
    ctx = field(reader, p + "context_length")
    rope_keys = {k.removeprefix(p): field(reader, k) for k in reader.fields if k.startswith(p + "rope.")}
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    pair = {t.name: t for t in reader.tensors if t.name in (ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT)}
    if recorded:
        r = json.loads(recorded)
        rope = RopeConfig(**r).describe()
    else:
        stype = rope_keys.get("rope.scaling.type", "none" if "rope.scaling.factor" not in rope_keys else "linear")
        rope = {"type": "rope_freqs" if freqs is not None else "longrope" if pair else stype,
                "factor": rope_keys.get("rope.scaling.factor", 1.0), "theta": rope_keys.get("rope.freq_base"),
                "original_context": rope_keys.get("rope.scaling.original_context_length", ctx)}
    rope["gguf_keys"] = rope_keys
    if freqs is not None:
        rope["rope_freqs"] = [float(x) for x in np.asarray(freqs.data, dtype=np.float32)]
    for name, t in pair.items():
        rope[name.removesuffix(".weight")] = [float(x) for x in np.asarray(t.data, dtype=np.float32)]
    types = Counter(t.tensor_type.name for t in reader.tensors)
    n_params = int(sum(int(np.prod(t.shape)) for t in reader.tensors if t.name not in ROPE_TENSORS))
    file_type = field(reader, "general.file_type")
    try:
        from gguf import LlamaFileType

        dtype = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_") if file_type is not None \
            else max(types, key=types.get)
    except ValueError:
        dtype = str(file_type)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    tokenizer = {"model": field(reader, "tokenizer.ggml.model"), "pre": field(reader, "tokenizer.ggml.pre"),
                 "tokens": len(tokens.data) if tokens is not None else 0,
                 "merges": len(reader.fields["tokenizer.ggml.merges"].data)
                 if "tokenizer.ggml.merges" in reader.fields else 0,
                 "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
                 "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
                 "add_bos_token": field(reader, "tokenizer.ggml.add_bos_token"),
                 "chat_template": field(reader, "tokenizer.chat_template") is not None}
    general = {k.removeprefix("general."): field(reader, k) for k in reader.fields
               if k.startswith("general.") and k != "general.architecture"}
    orig = rope.get("original_context") or rope_keys.get("rope.scaling.original_context_length") or ctx
    return {
        "format": "gguf",
        "path": str(path),
        "architecture": arch,
        "hf_architecture": field(reader, KEY_ARCH),
        "params": n_params,
        "dtype": dtype,
        "context_length": ctx,
        "original_context_length": orig,
        "rope": rope,
        "layers": field(reader, p + "block_count"),
        "hidden_size": field(reader, p + "embedding_length"),
        "heads": field(reader, p + "attention.head_count"),
        "kv_heads": field(reader, p + "attention.head_count_kv"),
        "tensor_types": dict(types),
        "tokenizer": tokenizer,
        "general": general,
        "files": {path.name: path.stat().st_size},
        "total_bytes": path.stat().st_size,
    }


def _register() -> None:
    from ..describe import register_format

    register_format("gguf", _is_gguf, describe_gguf)


_register()
