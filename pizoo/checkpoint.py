"""Hugging Face checkpoint folders: lazy, streaming reads and atomic, sharded writes.

A folder holds config.json, optional generation_config.json, tokenizer files and either
model.safetensors or shards listed in model.safetensors.index.json. Reading memory-maps the
safetensors and yields one tensor at a time; nothing is loaded whole unless `load_state_dict` is
called. Writing streams tensors into size-bounded shards inside a temporary folder that is renamed
into place only when complete, through `SafetensorsWriter`, the one safetensors writer of the project:
at most one tensor is in memory at a time, and the files are byte-identical to safetensors' own
`save_file`. Pickled weights (*.bin, *.pt) are never opened.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .config import ModelConfig
from .errors import PizooError
# Re-exported: callers read folder layouts through pizoo.checkpoint.
from .hf_folder import INDEX_FILE, SINGLE_FILE, TensorInfo, index_hf_folder, read_safetensors_header  # noqa: F401
from .fsutil import _default_mode, _fsync_dir, atomic_dir, atomic_write_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
GENERATION_FILE = "generation_config.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3

# safetensors dtype names -> (torch dtype, bytes per element)
ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
TORCH_TO_ST = {v[0]: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Checkpoint:
    """A read-only view of an HF checkpoint folder. Tensors are memory-mapped on demand."""

    def __init__(self, path: Path, config: ModelConfig, tensors: dict[str, TensorInfo], raw_config: dict):
        self.path = path
        self.config = config
        self.raw_config = raw_config
        self.tensors = tensors  # name -> TensorInfo, in file order

    # --- facts --------------------------------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def dtype(self) -> str:
        """The dominant floating dtype of the weights (by bytes), as a torch name."""
        by: dict[str, int] = {}
        for t in self.tensors.values():
            by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        st = max(by, key=by.get) if by else "F32"
        return str(ST_DTYPES[st][0]).removeprefix("torch.")

    def num_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]

    # --- tensor access ------------------------------------------------------------------------
    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise PizooError(f"{self.path}: no tensor named '{name}'")
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

    def iter_tensors(self, names: Iterable[str] | None = None, *, progress: bool = False,
                     desc: str = "reading") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, memory-mapped, grouped by file to keep one file open."""
        wanted = list(self.tensors) if names is None else list(names)
        by_file: dict[Path, list[str]] = {}
        for n in wanted:
            if n not in self.tensors:
                raise PizooError(f"{self.path}: no tensor named '{n}'")
            by_file.setdefault(self.tensors[n].file, []).append(n)
        bar = tqdm(total=sum(self.tensors[n].nbytes for n in wanted), unit="B", unit_scale=True,
                   desc=desc, disable=not progress, leave=False)
        try:
            for file, file_names in by_file.items():
                with safe_open(str(file), framework="pt") as f:
                    for n in file_names:
                        t = f.get_tensor(n)
                        bar.update(self.tensors[n].nbytes)
                        yield n, t
        finally:
            bar.close()

    def iter_model_tensors(self, *, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """iter_tensors under pizoo's model parameter names (a family's own names mapped, GPT-NeoX's)."""
        model_name = self.config.family.model_name
        for name, t in self.iter_tensors(progress=progress):
            yield model_name(name), t

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor in RAM (only when explicitly asked: small models, tests)."""
        return dict(self.iter_tensors())


def open_checkpoint(path: str | os.PathLike, *, validate: bool = True) -> Checkpoint:
    """Open an HF folder: parse config.json, index the safetensors headers, check shapes."""
    path = Path(path)
    cfg, raw, tensors = index_hf_folder(path, validate=validate)
    return Checkpoint(path, cfg, tensors, raw)


# --------------------------------------------------------------------------------------------
# Writing

# safetensors' order of the tensors in a file, whatever order save_file is given them: by dtype,
# widest first (its Rust Dtype enum, descending), then by name (bytewise). Matching it keeps pizoo's
# files byte-identical to save_file's.
_ST_ORDER = {name: i for i, name in enumerate(
    ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"))}
_COPY_CHUNK = 16 << 20  # the pread/pwrite fallback's buffer where copy_file_range is unavailable


def safetensors_header(layout: Iterable[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header save_file writes for tensors (name, safetensors dtype name, shape): the 8-byte
    little-endian length, compact JSON padded with spaces to 8 bytes. Returns it and each tensor's
    (start, end) in the data section, which follows the header."""
    entries = sorted(layout, key=lambda e: (_ST_ORDER[e[1]], e[0].encode("utf-8")))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    ranges: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, st, shape in entries:
        nbytes = math.prod(shape) * ST_DTYPES[st][1]
        header[name] = {"dtype": st, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        ranges[name] = (offset, offset + nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts on an 8-byte boundary
    return struct.pack("<Q", len(raw)) + raw, ranges


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)  # one call writes at most ~2 GiB on Linux
        view, offset = view[n:], offset + n


def _copy_range(src: int, dst: int, count: int, src_off: int, dst_off: int) -> None:
    """Copy bytes between files in the kernel (os.copy_file_range; a reflink on btrfs/XFS), else
    through a bounded buffer."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, count, src_off, dst_off)
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL,
                                                          errno.EPERM, errno.EBADF):
                raise
            n = 0
        if n <= 0:  # unsupported here: copy through user space
            buf = os.pread(src, min(count, _COPY_CHUNK), src_off)
            if not buf:
                raise OSError(errno.EIO, "temporary data file is shorter than written")
            _pwrite_all(dst, buf, dst_off)
            n = len(buf)
        count, src_off, dst_off = count - n, src_off + n, dst_off + n


class SafetensorsWriter:
    """One safetensors file, written with at most one tensor in memory at a time.

    The header (every tensor's dtype, shape and offsets) must come first in the file, so:

    * with `layout` (name, torch dtype, shape for every tensor, known up front as from
      ModelConfig.expected_shapes() or a source's TensorInfo), the header is written at once and
      each tensor goes straight to its offset when it arrives, in any order: one pass over the bytes;
    * without it, tensors are appended to a temporary data file beside the output and `close()`
      writes the header and moves each tensor's bytes into place with os.copy_file_range, in the
      kernel (a pread/pwrite fallback where unsupported). That costs a second pass over the bytes on
      disk and the file's size in temporary space, never memory.

    Either way the file is byte-identical to `safetensors.torch.save_file(tensors, metadata=...)`
    (tensors ordered by dtype then name, as save_file orders them). It is written to a temporary
    sibling, fsynced and renamed into place by `close()` with the umask's default mode; on error or
    `abort()` nothing is left. Bad input raises PizooError; I/O errors propagate as OSError for the
    caller to word. Use it as a context manager (close on success, abort on error).
    """

    def __init__(self, path: str | os.PathLike, layout: Iterable[tuple[str, torch.dtype, Sequence[int]]] | None = None,
                 *, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = {"format": "pt"} if metadata is None else metadata
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise PizooError(f"{self.path}: safetensors metadata must map strings to strings")
        self._written: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (dtype, shape), arrival order
        self._data_offsets: dict[str, int] = {}  # name -> offset in the temporary data file
        self._data_len = 0
        self._data_fd = self._data_tmp = None
        self._layout: dict[str, tuple[str, tuple[int, ...]]] | None = None
        if layout is not None:
            self._layout = {}
            for name, dtype, shape in layout:
                if name in self._layout:
                    raise PizooError(f"{self.path}: tensor '{name}' appears twice in the layout")
                self._layout[name] = (self._st_dtype(name, dtype), tuple(int(d) for d in shape))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._fd: int | None = fd
        try:
            if self._layout is not None:
                head, self._ranges = safetensors_header(((n, st, s) for n, (st, s) in self._layout.items()),
                                                        self.metadata)
                self._base = len(head)
                _pwrite_all(fd, head, 0)
                os.ftruncate(fd, self._base + max((e for _, e in self._ranges.values()), default=0))
            else:
                dfd, self._data_tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data.tmp",
                                                       dir=self.path.parent)
                self._data_fd = dfd
        except BaseException:
            self.abort()
            raise

    def _st_dtype(self, name: str, dtype: torch.dtype) -> str:
        st = TORCH_TO_ST.get(dtype)
        if st is None:
            raise PizooError(f"{self.path}: tensor '{name}' has dtype {dtype}; pizoo writes "
                             f"{', '.join(str(d).removeprefix('torch.') for d in TORCH_TO_ST)}")
        return st

    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Write one tensor (copied to the host first if on a device); returns its byte count."""
        if self._fd is None:
            raise PizooError(f"{self.path}: the writer is already closed")
        if not isinstance(tensor, torch.Tensor):
            raise PizooError(f"{self.path}: '{name}' is a {type(tensor).__name__}, not a tensor")
        if name in self._written:
            raise PizooError(f"{self.path}: tensor '{name}' written twice")
        st, shape = self._st_dtype(name, tensor.dtype), tuple(tensor.shape)
        if self._layout is not None:
            want = self._layout.get(name)
            if want is None:
                raise PizooError(f"{self.path}: tensor '{name}' is not in the layout this file was started with")
            if want != (st, shape):
                raise PizooError(f"{self.path}: tensor '{name}' is {st} {list(shape)} but the layout says "
                                 f"{want[0]} {list(want[1])}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()  # a view: no copy on the host
        if self._layout is not None:
            _pwrite_all(self._fd, data, self._base + self._ranges[name][0])
        else:
            _pwrite_all(self._data_fd, data, self._data_len)
            self._data_offsets[name] = self._data_len
            self._data_len += data.nbytes
        self._written[name] = (st, shape)
        return data.nbytes

    def close(self) -> Path:
        """Finish the file (header, data, fsync) and rename it into place; returns its path."""
        if self._fd is None:
            raise PizooError(f"{self.path}: the writer is already closed")
        try:
            if self._layout is not None:
                missing = [n for n in self._layout if n not in self._written]
                if missing:
                    raise PizooError(f"{self.path}: tensor '{missing[0]}' is in the layout but was never written "
                                     f"({len(missing)} missing)")
            else:
                head, ranges = safetensors_header(((n, st, s) for n, (st, s) in self._written.items()), self.metadata)
                _pwrite_all(self._fd, head, 0)
                for name, (start, end) in ranges.items():
                    _copy_range(self._data_fd, self._fd, end - start, self._data_offsets[name], len(head) + start)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.chmod(self._tmp, _default_mode(0o666))  # mkstemp made it private (0600)
            os.replace(self._tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self._drop_data()
        return self.path

    def _drop_data(self) -> None:
        if self._data_fd is not None:
            os.close(self._data_fd)
            self._data_fd = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._data_tmp)

    def abort(self) -> None:
        """Discard everything written; the final path is never touched."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
        self._drop_data()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]], *,
                      layout: Iterable[tuple[str, torch.dtype, Sequence[int]]] | None = None,
                      metadata: dict[str, str] | None = None) -> Path:
    """Stream (name, tensor) pairs into one safetensors file (see SafetensorsWriter); atomic."""
    with SafetensorsWriter(path, layout, metadata=metadata) as w:
        for name, t in tensors:
            w.add(name, t)
            del t  # let the caller's next tensor replace this one, not join it
    return w.path


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def write_checkpoint(out: str | os.PathLike, config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], *,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, copy_files_from: str | os.PathLike | None = None,
                     generation_config: dict | None = None, overwrite: bool = False, dtype: torch.dtype | None = None,
                     progress: bool = False, extra_files: dict[str, str] | None = None,
                     finish: Callable[[Path], None] | None = None) -> Path:
    """Write an HF folder atomically, streaming `tensors` into shards of at most `max_shard_bytes`.

    Tensors are written as given (dtype kept) unless `dtype` converts floating tensors. Tokenizer
    files and generation_config.json are copied from `copy_files_from`. Each tensor goes to disk as
    it arrives (SafetensorsWriter without a layout), so memory is bounded by the largest tensor, not
    the shard; a shard's bytes pass through a temporary file beside it once. `finish(tmp)` writes
    anything else into the folder after the weights, before it is renamed into place.
    """
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shards: list[tuple[str, list[str]]] = []
        writer: SafetensorsWriter | None = None
        current_bytes = 0
        total_bytes = 0
        seen: set[str] = set()
        bar = tqdm(unit="B", unit_scale=True, desc="writing", disable=not progress, leave=False)
        try:
            for name, t in tensors:
                if name in seen:
                    raise PizooError(f"{out}: tensor '{name}' written twice")
                seen.add(name)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                nbytes = t.numel() * t.element_size()
                if writer is not None and current_bytes + nbytes > max_shard_bytes:
                    writer.close()
                    writer = None
                if writer is None:
                    shards.append((f"shard-{len(shards):05d}.tmp", []))
                    writer = SafetensorsWriter(tmp / shards[-1][0], metadata={"format": "pt"})
                    current_bytes = 0
                writer.add(name, t)
                del t  # the next tensor replaces this one in memory
                shards[-1][1].append(name)
                current_bytes += nbytes
                total_bytes += nbytes
                bar.update(nbytes)
            if writer is not None:
                writer.close()
                writer = None
        except OSError as e:
            raise PizooError(f"{out}: cannot write the weights ({e.strerror or e}); check free space and "
                             "permissions") from None
        finally:
            if writer is not None:
                writer.abort()
            bar.close()
        if not shards:
            raise PizooError(f"{out}: no tensors to write")
        if len(shards) == 1:
            os.replace(tmp / shards[0][0], tmp / SINGLE_FILE)
        else:
            weight_map: dict[str, str] = {}
            for i, (tmp_name, names) in enumerate(shards, start=1):
                final = _shard_name(i, len(shards))
                os.replace(tmp / tmp_name, tmp / final)
                weight_map.update({n: final for n in names})
            atomic_write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total_bytes},
                                                 "weight_map": dict(sorted(weight_map.items()))})
        hf = config.to_hf_dict()
        if dtype is not None:
            hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
        atomic_write_json(tmp / "config.json", hf)
        if copy_files_from is not None:
            src = Path(copy_files_from)
            for fname in TOKENIZER_FILES + (GENERATION_FILE,):
                if (src / fname).is_file():
                    shutil.copy2(src / fname, tmp / fname)
        if generation_config is not None:
            atomic_write_json(tmp / GENERATION_FILE, generation_config)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
        if finish is not None:
            finish(tmp)
    return out


def save_model(model: torch.nn.Module, out: str | os.PathLike, config: ModelConfig | None = None, **kwargs) -> Path:
    """Write a pizoo LlamaModel as an HF folder (see write_checkpoint for options)."""
    cfg = config or model.config
    sd = model.hf_state_dict()
    return write_checkpoint(out, cfg, sd.items(), **kwargs)


def parse_dtype(name: str | None, where: str = "--dtype") -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise PizooError(f"{where}: unknown dtype '{name}'; use float32, float16 or bfloat16")
    return DTYPE_NAMES[name]
