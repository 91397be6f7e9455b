"""The exported bytes of every tiny variant, as sha256 values: the record that a refactor of how
families are described changes no file pizoo writes.

`python tests/export_identity.py` (with PYTHONPATH at the checkout) rewrites
tests/fixtures/export_sha256.json; do that only for a change that is meant to alter the files, and
say why in the commit. tests/test_export_identity.py recomputes and compares.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "export_sha256.json"
VARIANTS = ("llama", "llama-gqa-tied", "mistral", "qwen2")
# (name, method, factor): unscaled, a keyed form (yarn) and a per-frequency form (llama3, which sends
# a qwen2 model out as GGUF arch llama with rope_freqs and permuted q/k).
ROPES = (("base", None, None), ("yarn", "yarn", 4.0), ("llama3", "llama3", 4.0))
GGUF_TYPES = ("f32",)
TRTLLM = (("float16", 2),)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compute(root: Path) -> dict[str, str]:
    """sha256 of every GGUF and TensorRT-LLM file (README excepted: it names the source path)."""
    from pizoo.config import RopeConfig
    from pizoo.export.gguf import export_gguf
    from pizoo.export.trtllm import export_trtllm
    from pizoo.synthetic import write_tiny_model

    out: dict[str, str] = {}
    for variant in VARIANTS:
        tok = "sentencepiece" if variant == "llama" else "bpe"
        for rope_name, method, factor in ROPES:
            # The folder name is the GGUF basename, so it is fixed.
            src = root / f"{variant}-{rope_name}" / "model"
            rope = None if method is None else RopeConfig(theta=10000.0).scaled(method, factor, 64)
            ctx = 64 if factor is None else int(64 * factor)
            write_tiny_model(src, variant, tokenizer=tok, rope=rope, max_position_embeddings=ctx)
            for dtype in GGUF_TYPES:
                path = export_gguf(src, root / f"{variant}-{rope_name}-{dtype}.gguf", dtype=dtype)
                out[f"{variant}/{rope_name}/gguf-{dtype}"] = _sha(path)
            for dtype, tp in TRTLLM:
                ckpt = export_trtllm(src, root / f"{variant}-{rope_name}-trt-{dtype}-tp{tp}", dtype=dtype, tp=tp)
                for f in sorted(ckpt.iterdir()):
                    if f.name != "README.md":
                        out[f"{variant}/{rope_name}/trtllm-{dtype}-tp{tp}/{f.name}"] = _sha(f)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hashes = compute(Path(tmp))
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(hashes)} hashes to {FIXTURE}", file=sys.stderr)


if __name__ == "__main__":
    main()
