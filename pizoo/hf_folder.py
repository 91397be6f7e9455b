"""A Hugging Face model folder's layout, read without torch: config.json and the safetensors
headers (which tensors, where, what dtype and shape), validated against each other.

pizoo.checkpoint builds its tensor access on this; exporters that never need torch (the GGUF
writer streams raw bytes) use it directly, so their peak memory stays free of torch's ~200 MiB.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .errors import PizooError
from .fsutil import read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names -> bytes per element
ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Tensors some checkpoints carry that the model recomputes; harmless to skip.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading tensor data.

    Checks what safe_open would only discover late (or not at all): truncation, overlapping or
    out-of-range offsets, unknown dtypes, and byte counts that disagree with shapes.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PizooError(f"{path}: not a safetensors file (only {size} bytes); re-download or re-export it")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or 8 + n > size:
                raise PizooError(f"{path}: truncated or corrupt safetensors header (claims {n} bytes, file has {size}); "
                                 "re-download or re-export it")
            raw = f.read(n)
    except OSError as e:
        raise PizooError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PizooError(f"{path}: corrupt safetensors header (not JSON); re-download or re-export it") from None
    if not isinstance(header, dict):
        raise PizooError(f"{path}: corrupt safetensors header; re-download or re-export it")
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    end_max = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise PizooError(f"{path}: corrupt safetensors entry for '{name}'; re-download or re-export it") from None
        if dtype not in ST_SIZES:
            raise PizooError(f"{path}: tensor '{name}' has dtype {dtype}, which pizoo does not read")
        expected = math.prod(shape) * ST_SIZES[dtype]
        if end - begin != expected or begin < 0:
            raise PizooError(f"{path}: tensor '{name}' holds {end - begin} bytes but shape {list(shape)} "
                             f"{dtype} needs {expected}; the file is corrupt")
        if end > data_len:
            raise PizooError(f"{path}: truncated: tensor '{name}' ends at byte {end} but only {data_len} data bytes "
                             "exist; re-download or re-export it")
        end_max = max(end_max, end)
        out[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    if end_max != data_len:
        raise PizooError(f"{path}: {data_len - end_max} trailing bytes after the last tensor; the file is corrupt")
    return out



def _validate_shapes(path: Path, cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> None:
    expected = cfg.expected_shapes()
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            if name == "lm_head.weight":
                raise PizooError(f"{path}: tensor 'lm_head.weight' is missing but config.json has "
                                 "tie_word_embeddings=false; set it to true if the head is tied")
            raise PizooError(f"{path}: tensor '{name}' is missing from the safetensors files")
        if info.shape != shape:
            raise PizooError(f"{info.file}: tensor '{name}' has shape {list(info.shape)} but config.json implies "
                             f"{list(shape)}; the weights and config.json disagree")
    for name in tensors:
        if name not in expected and not name.endswith(IGNORED_SUFFIXES):
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some exporters store the tied head anyway; it is ignored
            raise PizooError(f"{tensors[name].file}: unexpected tensor '{name}' for a {cfg.architecture} model "
                             "with this config.json")


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def index_hf_folder(path: str | os.PathLike, *, validate: bool = True) -> tuple[ModelConfig, dict, dict[str, TensorInfo]]:
    """(config, raw config.json, tensor index) of an HF folder: config parsed, every safetensors
    header indexed and checked, shapes checked against the config. Reads no tensor data."""
    path = Path(path)
    if not path.exists():
        raise PizooError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise PizooError(f"{path}: expected a Hugging Face model folder (with config.json)")
    if not (path / "config.json").is_file():
        raise PizooError(f"{path}: no config.json; is this a Hugging Face model folder?")
    raw = read_json(path / "config.json", "config.json")
    cfg = ModelConfig.from_hf_dict(raw, str(path / "config.json"))
    tensors: dict[str, TensorInfo] = {}
    if (path / INDEX_FILE).is_file():
        index = read_json(path / INDEX_FILE, INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PizooError(f"{path / INDEX_FILE}: missing or empty 'weight_map'")
        files = sorted(set(weight_map.values()))
        for fname in files:
            fpath = path / fname
            if not fpath.is_file():
                raise PizooError(f"{path / INDEX_FILE}: lists shard '{fname}', which does not exist")
            header = read_safetensors_header(fpath)
            for n, info in header.items():
                if weight_map.get(n) != fname:
                    raise PizooError(f"{fpath}: holds tensor '{n}' that {INDEX_FILE} does not map to this file")
                tensors[n] = info
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise PizooError(f"{path / INDEX_FILE}: tensor '{missing[0]}' is listed but not in its shard")
    elif (path / SINGLE_FILE).is_file():
        tensors = read_safetensors_header(path / SINGLE_FILE)
    else:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise PizooError(f"{path}: only pickled weights ({pickles[0]}); pizoo never unpickles untrusted files. "
                             "Convert them to safetensors first")
        raise PizooError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    if validate:
        _validate_shapes(path, cfg, tensors)
    return cfg, raw, tensors


