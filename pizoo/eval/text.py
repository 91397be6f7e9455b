"""Text -> tokens for evaluation: the tokenizer's special tokens, and a fingerprint of a token stream."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch


class TextEncoder:
    """Text -> token ids the way the model's tokenizer files say.

    tokenizer_config.json's add_bos_token / add_eos_token decide the special tokens when present
    (transformers does the same); otherwise tokenizer.json's own post-processor does, probed once.
    """

    def __init__(self, folder: str | Path):
        from ..data import special_ids
        from ..tokenizer import load_tokenizer, tokenizer_config

        self.folder = Path(folder)
        self.tokenizer = load_tokenizer(self.folder)
        tok_cfg = tokenizer_config(self.folder)
        if "add_bos_token" in tok_cfg or "add_eos_token" in tok_cfg:
            bos, eos = special_ids(self.folder, None, None)
            self.prefix = [bos] if tok_cfg.get("add_bos_token") and bos is not None else []
            self.suffix = [eos] if tok_cfg.get("add_eos_token") and eos is not None else []
        else:
            probe = "pass key"
            plain = self.tokenizer.encode(probe, add_special_tokens=False).ids
            full = self.tokenizer.encode(probe, add_special_tokens=True).ids
            at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
            self.prefix, self.suffix = full[:at], full[at + len(plain):]

    def plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def plain_batch(self, texts: list[str]) -> list[list[int]]:
        """plain() of each text, tokenized in parallel (the tokenizers library's thread pool)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def document(self, text: str) -> list[int]:
        """A whole document with the tokenizer's special tokens (what the model saw in training)."""
        return self.prefix + self.plain(text) + self.suffix

    def identity(self) -> str:
        """A hash of what decides tokenization (two models with equal identities tokenize alike)."""
        h = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            p = self.folder / name
            h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b""))
        h.update(json.dumps([self.prefix, self.suffix]).encode())
        return h.hexdigest()


def tokens_fingerprint(token_docs: Sequence[torch.Tensor]) -> str:
    """sha256 of the exact token stream (document boundaries included)."""
    h = hashlib.sha256()
    for t in token_docs:
        arr = t.to(torch.int64).contiguous().numpy()
        h.update(len(arr).to_bytes(8, "little"))
        h.update(arr.tobytes())
    return h.hexdigest()
