"""`pizoo inspect`: describe a checkpoint (HF folder, GGUF file, TensorRT-LLM checkpoint).

Each format registers a detector and a describer in `FORMATS`; the first detector that accepts the
path wins. The JSON keys are stable: format, architecture, params, dtype, context_length,
original_context_length, rope {type, factor, theta, ...}, plus format-specific keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import PizooError

Detector = Callable[[Path], bool]
Describer = Callable[[Path], dict[str, Any]]
FORMATS: list[tuple[str, Detector, Describer]] = []


def register_format(name: str, detect: Detector, describe: Describer, *, before: str | None = None) -> None:
    """Add a format; `before` names a format whose detector would also accept these paths (a
    TensorRT-LLM checkpoint folder also has a config.json, so it must be tried before "hf")."""
    names = [n for n, _, _ in FORMATS]
    if before in names:
        FORMATS.insert(names.index(before), (name, detect, describe))
    else:
        FORMATS.append((name, detect, describe))


def describe_hf(path: Path) -> dict[str, Any]:
    from .checkpoint import open_checkpoint
    from .tokenizer import tokenizer_kind

    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    info: dict[str, Any] = {
        "format": "hf",
        "path": str(path),
        "architecture": cfg.architecture,
        "params": ckpt.num_params(),
        "dtype": ckpt.dtype(),
        "context_length": cfg.context_length,
        "original_context_length": cfg.original_context,
        "rope": cfg.rope.describe(),
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "tokenizer": tokenizer_kind(path),
        "shards": len(ckpt.files),
        "files": files,
        "total_bytes": sum(files.values()),
    }
    warning = (ckpt.raw_config.get("pizoo") or {}).get("warning")
    if warning:
        info["warnings"] = [warning]
    return info


def _is_hf(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


register_format("hf", _is_hf, describe_hf)


def _load_format_plugins() -> None:
    """Import exporters that register their own formats (GGUF, TensorRT-LLM) if present."""
    import importlib

    for mod in ("pizoo.export.gguf", "pizoo.export.trtllm"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def inspect_path(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise PizooError(f"{path}: no such file or folder")
    _load_format_plugins()
    for _name, detect, describe in FORMATS:
        if detect(path):
            return describe(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise PizooError(f"{path}: not a GGUF file (it does not start with the GGUF magic); re-download or "
                         "re-export it")
    raise PizooError(f"{path}: not a recognised checkpoint (expected an HF folder with config.json, "
                     "a .gguf file or a TensorRT-LLM checkpoint folder)")
