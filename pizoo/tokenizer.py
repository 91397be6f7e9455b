"""Tokenizer files of an HF folder: what kind they are, and loading them with `tokenizers`."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PizooError


def tokenizer_kind(folder: Path) -> str:
    """'bpe (byte-level)', 'sentencepiece (bpe)', 'sentencepiece (unigram)', 'wordpiece', or 'none'."""
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            spec = json.loads(tj.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            raise PizooError(f"{tj}: not valid JSON; re-download the tokenizer") from None
        model = (spec.get("model") or {}).get("type")
        if model == "Unigram":
            return "sentencepiece (unigram)"
        if model == "WordPiece":
            return "wordpiece"
        if model == "BPE":
            pre = json.dumps(spec.get("pre_tokenizer") or {})
            if "ByteLevel" in pre:
                return "bpe (byte-level)"
            if spec["model"].get("byte_fallback") or "Metaspace" in pre or "Metaspace" in json.dumps(spec.get("normalizer") or {}):
                return "sentencepiece (bpe)"
            return "bpe"
        return str(model or "unknown").lower()
    if (folder / "tokenizer.model").is_file():
        return "sentencepiece"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return "bpe (byte-level)"
    return "none"


def load_tokenizer(folder: Path):
    """A `tokenizers.Tokenizer` from tokenizer.json (the one format pizoo tokenizes with)."""
    from tokenizers import Tokenizer

    tj = Path(folder) / "tokenizer.json"
    if not tj.is_file():
        raise PizooError(f"{folder}: no tokenizer.json; pizoo needs the fast-tokenizer file to tokenize text")
    try:
        return Tokenizer.from_file(str(tj))
    except Exception as e:  # tokenizers raises a plain Exception on bad files
        raise PizooError(f"{tj}: cannot load tokenizer: {str(e).splitlines()[0]}") from None


def tokenizer_config(folder: Path) -> dict:
    p = Path(folder) / "tokenizer_config.json"
    if not p.is_file():
        return {}
    from .fsutil import read_json

    return read_json(p, "tokenizer_config.json")
