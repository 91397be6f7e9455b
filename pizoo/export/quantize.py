"""The GGUF quant ladder: pizoo writes the f16 (or bf16/f32) file, llama.cpp's own quantizer makes the rest.

K-quants and i-quants are never reimplemented here: every quantized file comes from
`llama_model_quantize` (llama-cpp-python, the optional extra `pizoo[quant]`), the function behind
`llama-quantize`, given the same f16 file and the default parameters with only `ftype` and `nthread`
set, so its bytes are what `llama-quantize F16.gguf OUT.gguf TYPE` writes. The quantizer copies every
key and tensor it does not quantize, so the RoPE keys, `rope_freqs.weight` (1-D, kept f32), the
`general.*` lineage and pizoo's own `pizoo.*` block survive in every rung.

What llama.cpp does with awkward inputs (checked in llama-quant.cpp of the vendored llama.cpp):
- a matrix whose rows are not a multiple of the type's block (256 for K- and most i-quants) is not an
  error: llama.cpp writes that tensor in a fallback type (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0,
  iq4_xs -> iq4_nl, ...; f16 when even 32 does not divide). pizoo reports those tensors by name;
- the very-low-bit types (iq1_*, iq2_*, iq3_xxs, iq3_xs, q2_k_s) refuse to run without an importance
  matrix; pizoo does not compute one, so it refuses them up front with one line;
- tq1_0/tq2_0 are ternary formats only for models trained ternary (BitNet), mxfp4_moe only for MoE
  experts: refused as types a dense float model cannot produce.

Each file is written to a temporary sibling (fsutil.atomic_path) that the quantizer fills and that
is renamed into place only when it succeeded: a failure, Ctrl-C or SIGKILL leaves no half file, and
the next run removes a killed run's temporary.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import PizooError

# Types pizoo's own exporter writes from the safetensors (pizoo.export.gguf); a ladder's base is one
# of the float ones.
FLOAT_TYPES = ("f16", "bf16", "f32")
DIRECT_TYPES = FLOAT_TYPES + ("q8_0",)
# llama.cpp file types made by llama_model_quantize (llama_ftype LLAMA_FTYPE_MOSTLY_<NAME>).
QUANT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0",
               "iq4_xs", "iq4_nl", "q3_k_l", "q3_k_m", "q3_k_s", "iq3_m", "iq3_s", "q2_k")
NEEDS_IMATRIX = ("q2_k_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
NOT_FOR_DENSE_FLOAT = {"tq1_0": "a ternary format for models trained ternary (BitNet)",
                       "tq2_0": "a ternary format for models trained ternary (BitNet)",
                       "mxfp4_moe": "a format for mixture-of-experts expert tensors"}
# Approximate bits per weight of each type for planning (llama.cpp's quantize table, 7B Llama).
APPROX_BPW = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.7, "q5_k_s": 5.5,
              "q5_1": 6.0, "q5_0": 5.5, "q4_k_m": 4.89, "q4_k_s": 4.58, "q4_1": 5.0, "q4_0": 4.5, "iq4_xs": 4.25,
              "iq4_nl": 4.5, "q3_k_l": 4.27, "q3_k_m": 3.91, "q3_k_s": 3.5, "iq3_m": 3.66, "iq3_s": 3.44, "q2_k": 3.0}
ALL_TYPES = DIRECT_TYPES + tuple(t for t in QUANT_TYPES if t not in DIRECT_TYPES)
EXTRA_HINT = "pip install 'pizoo[quant]' (llama-cpp-python, which builds llama.cpp's quantizer)"


def parse_gguf_types(text: str | list[str] | tuple[str, ...], option: str = "--gguf-dtype") -> tuple[str, ...]:
    """'f16,q8_0,Q4_K_M' -> ('f16', 'q8_0', 'q4_k_m'): lower case, in order, duplicates dropped, each
    checked. Raises a one-line PizooError naming the option and the type."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    types: list[str] = []
    for part in parts:
        t = part.strip().lower()
        if not t:
            continue
        if t in NEEDS_IMATRIX:
            raise PizooError(f"{option} {t}: llama.cpp makes {t.upper()} only with an importance matrix, which pizoo "
                             "does not compute; choose iq4_xs, q4_k_m or q3_k_m, or run llama-quantize --imatrix "
                             "on pizoo's f16 file")
        if t in NOT_FOR_DENSE_FLOAT:
            raise PizooError(f"{option} {t}: {NOT_FOR_DENSE_FLOAT[t]}; a dense float model cannot produce it")
        if t not in ALL_TYPES:
            raise PizooError(f"{option} {t}: unknown GGUF type; use a comma-separated list of "
                             f"{', '.join(ALL_TYPES)}")
        if t not in types:
            types.append(t)
    if not types:
        raise PizooError(f"{option}: empty; give one or more of {', '.join(ALL_TYPES)}")
    return tuple(types)


def ladder_bytes(types: str | tuple[str, ...], params: int) -> float:
    """About how many bytes the GGUF files of these types take for a model of `params` weights
    (the f16 intermediate of a ladder without a float type not counted: it is removed)."""
    types = parse_gguf_types(types) if isinstance(types, str) else types
    return sum(APPROX_BPW[t] / 8 * params for t in types)


@dataclass
class LadderPlan:
    """Which files pizoo's exporter writes from the safetensors and which llama.cpp makes from the base."""

    direct: tuple[str, ...]  # written by pizoo.export.gguf (float types; a lone q8_0)
    base: str  # the float file the quants are made from (the first float type asked for, else f16)
    quants: tuple[str, ...]  # made by llama_model_quantize from the base file
    keep_base: bool  # False: the base was not asked for; it is an intermediate, removed at the end


def plan_ladder(types: tuple[str, ...], intermediate: str = "f16") -> LadderPlan:
    """The first float type asked for is the base; without one, an `intermediate` float file (bf16
    for a bf16 source: lossless, and no f16 overflow). A lone q8_0 is written directly by pizoo's
    exporter (bit-identical to ggml's q8_0, no extra needed)."""
    if types == ("q8_0",):
        return LadderPlan(("q8_0",), "q8_0", (), True)
    floats = tuple(t for t in types if t in FLOAT_TYPES)
    return LadderPlan(floats, floats[0] if floats else intermediate,
                      tuple(t for t in types if t not in FLOAT_TYPES), bool(floats))


# --------------------------------------------------------------------------------------------
# llama.cpp's quantizer


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise PizooError(f"GGUF quantization needs llama.cpp's quantizer: {EXTRA_HINT}") from None
    except OSError as e:  # the package is there but its shared library does not load
        raise PizooError(f"llama-cpp-python is installed but its library does not load ({e}); "
                         f"reinstall it: {EXTRA_HINT}") from None
    return llama_cpp


def quantizer_version() -> str:
    """llama-cpp-python's version (it pins the llama.cpp it vendors): part of a quant's provenance."""
    return str(getattr(_llama_cpp(), "__version__", "unknown"))


def ftype_of(qtype: str) -> int:
    lc = _llama_cpp()
    value = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if value is None:
        raise PizooError(f"--gguf-dtype {qtype}: this llama-cpp-python ({quantizer_version()}) has no "
                         f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}; upgrade it: {EXTRA_HINT}")
    return int(value)


def all_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _LogCapture:
    """llama.cpp's log lines during one quantization (its stderr chatter is swallowed): the error
    that names the tensor, and the tensors that fell back to another type."""

    _lock = threading.Lock()  # llama_log_set is process-wide

    def __init__(self, lc) -> None:
        self.lc = lc
        self.text: list[str] = []
        self._cb = None

    def __enter__(self) -> "_LogCapture":
        self._lock.acquire()

        @self.lc.llama_log_callback
        def collect(level, text, user_data):
            with contextlib.suppress(Exception):
                self.text.append(text.decode("utf-8", "replace"))

        self._cb = collect  # keep the ctypes callback alive while llama.cpp may call it
        self.lc.llama_log_set(collect, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            from llama_cpp import _logger

            self.lc.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        self._lock.release()

    def joined(self) -> str:
        return "".join(self.text)

    def fallbacks(self) -> list[dict[str, Any]]:
        """[{tensor, cols, block, wanted, written}] for every tensor llama.cpp wrote in a fallback type."""
        out: dict[str, dict[str, Any]] = {}  # by tensor: llama.cpp may decide a tensor's type twice
        for m in re.finditer(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+"
                             r"(\S+)\).*?-> falling back to\s+(\S+)", self.joined()):
            out[m.group(1)] = {"tensor": m.group(1), "cols": int(m.group(2)), "block": int(m.group(3)),
                               "wanted": m.group(4), "written": m.group(5)}
        return list(out.values())

    def error(self) -> str:
        text = self.joined()
        m = re.search(r"Missing importance matrix for tensor (\S+)", text)
        if m:
            return f"tensor {m.group(1)} needs an importance matrix"
        m = re.search(r"failed to quantize: (.+)", text)
        if m:
            return m.group(1).strip()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else "no message from llama.cpp"


@dataclass
class QuantResult:
    type: str
    path: Path
    bytes: int
    seconds: float
    fallbacks: list[dict[str, Any]] = field(default_factory=list)


def quantize_gguf(src: str | os.PathLike, out: str | os.PathLike, qtype: str, *, nthread: int | None = None,
                  overwrite: bool = False) -> QuantResult:
    """Make `out` (type `qtype`, e.g. q4_k_m) from the float GGUF `src` with llama.cpp's quantizer.

    Uses `nthread` threads (default: every core this process may use). Written atomically; a failure
    is a PizooError naming the type and, where llama.cpp names one, the tensor."""
    from ..fsutil import atomic_path
    from .gguf import open_gguf, field as gguf_field

    src, out = Path(src), Path(out)
    qtype = parse_gguf_types(qtype)[0]
    if qtype in FLOAT_TYPES:
        raise PizooError(f"{qtype}: a float type is written by pizoo's exporter, not the quantizer")
    lc = _llama_cpp()
    reader = open_gguf(src)
    file_type = gguf_field(reader, "general.file_type")
    if file_type not in (0, 1, 32):  # ALL_F32, MOSTLY_F16, MOSTLY_BF16
        raise PizooError(f"{src}: general.file_type {file_type} is not f32, f16 or bf16; quantize from a float GGUF "
                         "(pizoo convert --to gguf --dtype f16) so no quantization error compounds")
    del reader
    if out.exists() and not overwrite:
        raise PizooError(f"{out}: already exists; pass --overwrite or choose another --out")
    params = lc.llama_model_quantize_default_params()  # edit only the struct this version returns
    params.ftype = ftype_of(qtype)
    params.nthread = nthread or all_cores()
    lc.llama_backend_init()
    t0 = time.perf_counter()
    with atomic_path(out) as tmp, _LogCapture(lc) as log:
        rc = _run_releasing_ctrl_c(lambda: lc.llama_model_quantize(os.fsencode(src), os.fsencode(tmp),
                                                                    ctypes.byref(params)))
        if rc != 0:
            raise PizooError(f"{out.name}: llama.cpp could not quantize {src.name} to {qtype.upper()}: "
                             f"{log.error()}")
    return QuantResult(qtype, out, out.stat().st_size, time.perf_counter() - t0, log.fallbacks())


def _run_releasing_ctrl_c(call: Callable[[], int]) -> int:
    """Run a long C call in a daemon thread so that Ctrl-C and SIGTERM (KeyboardInterrupt in the main
    thread) stop the wait at once: atomic_path then removes the temporary, and the C call, writing to
    a removed file, ends with the process."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["rc"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e

    t = threading.Thread(target=work, name="llama-quantize", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
    if "error" in result:
        raise result["error"]
    return int(result["rc"])


def bits_per_weight(path: str | os.PathLike) -> float:
    """Bits per weight of a GGUF file as llama.cpp counts them: tensor bytes x 8 / tensor elements
    (rope_freqs, a table of RoPE divisors rather than a weight, left out)."""
    from .gguf import open_gguf

    reader = open_gguf(Path(path))
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    elements = sum(int(t.n_elements) for t in tensors)
    return 8.0 * sum(int(t.n_bytes) for t in tensors) / elements if elements else 0.0


# --------------------------------------------------------------------------------------------
# The ladder


@dataclass
class LadderFile:
    type: str
    path: Path
    bytes: int
    seconds: float
    made_by: str  # "pizoo" (the exporter) or "llama.cpp" (llama_model_quantize)
    reused: bool = False  # an earlier run's finished file, kept (pizoo extend's resume)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "file": self.path.name, "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "made_by": self.made_by, "reused": self.reused, "fallbacks": self.fallbacks}


Reuse = Callable[[str, Path, "Path | None"], bool]


@contextlib.contextmanager
def _scratch_file(path: Path):
    """A path for a temporary intermediate, inside a temporary sibling folder of `path` (fsutil's
    .NAME.XXXXXXXX.tmp pattern, held with a flock, so a killed run's leftover is swept by the next
    writer of `path`); the file does not exist yet, so the writer creates it as new. Always removed
    at the end."""
    import fcntl
    import shutil
    import tempfile

    from ..fsutil import remove_stale_temps

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield Path(tmp) / path.name
    finally:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def ladder_paths(src: Path, out: Path, types: tuple[str, ...], static_length: int | None = None) -> dict[str, Path]:
    """The file each type goes to: Hub-style names (Base-32K-PI-Q4_K_M.gguf) in the folder `out`, or
    `out` itself for a single type given a file name."""
    from ..hf_folder import index_hf_folder
    from .gguf import default_file_name

    cfg = index_hf_folder(src)[0]
    if out.suffix.lower() == ".gguf" and not out.is_dir():
        if len(types) > 1:
            raise PizooError(f"--out {out}: {len(types)} GGUF types go to a folder, not one file; give a folder")
        return {types[0]: out}
    return {t: out / default_file_name(src, cfg, t, static_length) for t in types}


def write_ladder(src: str | os.PathLike, out: str | os.PathLike, types: str | tuple[str, ...], *,
                 pre: str | None = None, static_length: int | None = None, overwrite: bool = False,
                 progress: bool = False, nthread: int | None = None, reuse: Reuse | None = None,
                 finished: Callable[[LadderFile], None] | None = None,
                 say: Callable[[str], None] | None = None) -> list[LadderFile]:
    """Write every GGUF type asked for from the HF folder `src`: the float file(s) by pizoo's exporter,
    then each quant from the base float file by llama.cpp's quantizer, one atomic file at a time.

    out: a folder (files named the Hub way) or, for one type, a .gguf file. reuse(type, path, base):
    True keeps an existing finished file (pizoo extend's resume; base is the float file a quant is
    made from, None for the exporter's files). finished(file) is called after each file is in place.
    Returns the files in the order written, the intermediate base (when no float type was asked
    for) left out: it is removed at the end.
    """
    from .gguf import export_gguf

    src, out = Path(src), Path(out)
    types = parse_gguf_types(types) if isinstance(types, str) else parse_gguf_types(list(types))
    from ..hf_folder import index_hf_folder

    source_dtype = index_hf_folder(src)[0].torch_dtype
    plan = plan_ladder(types, intermediate="bf16" if source_dtype == "bfloat16" else "f16")
    if plan.quants:
        _llama_cpp()  # the missing extra is reported before any file is written
    paths = ladder_paths(src, out, types, static_length)
    if plan.base not in paths:  # the intermediate: a temporary beside the first output
        paths[plan.base] = ladder_paths(src, paths[types[0]].parent, (plan.base,), static_length)[plan.base]
    if not overwrite:
        for t in types:
            if paths[t].exists():
                raise PizooError(f"{paths[t]}: already exists; pass --overwrite or choose another --out")
    say = say or (lambda _msg: None)
    done: list[LadderFile] = []

    def emit(f: LadderFile) -> None:
        done.append(f)
        if finished:
            finished(f)
        what = "kept (already made)" if f.reused else f"{f.seconds:.1f} s" + (f", {len(f.fallbacks)} tensor(s) in a "
                                                                            "fallback type" if f.fallbacks else "")
        say(f"gguf {f.type}: {f.path.name} ({f.bytes / 2**20:.1f} MiB, {what})")

    def export(t: str, path: Path, scratch: bool = False) -> LadderFile:
        if reuse and not scratch and path.exists() and reuse(t, path, None):
            return LadderFile(t, path, path.stat().st_size, 0.0, "pizoo", reused=True)
        t0 = time.perf_counter()
        export_gguf(src, path, dtype=t, pre=pre, static_length=static_length, overwrite=True, progress=progress)
        return LadderFile(t, path, path.stat().st_size, time.perf_counter() - t0, "pizoo")

    for t in plan.direct:
        emit(export(t, paths[t]))
    with contextlib.ExitStack() as stack:
        base = paths[plan.base]
        if plan.quants and not plan.keep_base:
            base = stack.enter_context(_scratch_file(base))
            export(plan.base, base, scratch=True)
        for q in plan.quants:
            path = paths[q]
            if reuse and path.exists() and reuse(q, path, base):
                emit(LadderFile(q, path, path.stat().st_size, 0.0, "llama.cpp", reused=True))
                continue
            r = quantize_gguf(base, path, q, nthread=nthread, overwrite=True)
            emit(LadderFile(q, path, r.bytes, r.seconds, "llama.cpp", fallbacks=r.fallbacks))
    return done
