"""Model fingerprints and the evaluation cache.

Results are cached under PIZOO_HOME/eval-cache, keyed by the model's fingerprint (see
`model_fingerprint`), the exact token stream, and every setting that changes a number, so a
repeated evaluation is instant and never loads the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import PizooError

CACHE_VERSION = "pizoo-eval-v1"


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(min(n, 100 << 20))


def _sample_bytes(path: Path, size: int, samples: int = 16, width: int = 1 << 16) -> bytes:
    """`samples` evenly spaced slices of the file (new weights change them; a copy does not)."""
    out = []
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, (size - width) * i // max(1, samples - 1)))
            out.append(f.read(width))
    return b"".join(out)


def model_fingerprint(folder: str | Path, *, full: bool = False) -> str:
    """A sha256 identifying a model folder's numbers.

    Fast mode (default): the bytes of config.json and the tokenizer files, and for every weight
    file its name, size, modification time, safetensors header and 16 evenly spaced 64 KiB
    samples. New weights, a new config, a new tokenizer or a rewritten file all change it; a copy
    that keeps modification times (cp -p, shutil.copytree) does not. `full=True` hashes every byte
    of every weight file instead of sizes, times and samples (slow for big models, exact).
    """
    from ..checkpoint import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES
    from ..fsutil import sha256_file

    folder = Path(folder)
    h = hashlib.sha256(b"pizoo-model-fingerprint-v1\0" + (b"full" if full else b"fast"))
    for name in ("config.json", INDEX_FILE) + TOKENIZER_FILES:
        p = folder / name
        if p.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    for p in sorted(folder.glob("*.safetensors")):
        st = p.stat()
        h.update(p.name.encode() + b"\0")
        if full:
            h.update(sha256_file(p).encode())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(hashlib.sha256(_safetensors_header(p)).digest())
            h.update(hashlib.sha256(_sample_bytes(p, st.st_size)).digest())
    if not (folder / SINGLE_FILE).is_file() and not (folder / INDEX_FILE).is_file():
        raise PizooError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    return h.hexdigest()


class EvalCache:
    """JSON results under PIZOO_HOME/eval-cache/<key[:2]>/<key>.json, written atomically."""

    def __init__(self, root: Path | None = None, enabled: bool = True):
        from ..zoo import pizoo_home

        self.root = Path(root) if root is not None else pizoo_home() / "eval-cache"
        self.enabled = enabled
        self.unwritable: str | None = None  # why results could not be stored (read-only, full), once

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if not self.enabled:
            return None
        p = self._path(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a missing or unreadable entry is just a miss

    def put(self, key: str, value: dict) -> None:
        if not self.enabled:
            return
        from ..fsutil import atomic_write_json

        try:
            atomic_write_json(self._path(key), value)
        except (OSError, PizooError) as e:  # the write path reports an OSError as a PizooError line
            # The cache is an optimisation: a read-only or full PIZOO_HOME must not fail the evaluation
            # (its temporary is already gone), and is not tried again for every result.
            self.enabled, self.unwritable = False, str(e).split("; ")[0]
