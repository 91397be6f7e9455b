"""HF -> TensorRT-LLM checkpoint: config.json plus one rank{N}.safetensors per GPU.

`trtllm-build --checkpoint_dir OUT` reads exactly these files (TensorRT-LLM's
`PretrainedModel.from_checkpoint` opens config.json and rank{N}.safetensors only, so the README.md
written beside them is ignored by it). Facts this module relies on, checked against TensorRT-LLM's
public source (tensorrt_llm/models/{modeling_utils,llama,qwen}, layers/attention.py,
functional.py RopeEmbeddingUtils, commands/build.py):

- Weights keep HF's (out, in) layout. Rank r = pp_rank * tp + tp_rank. Layer numbers restart at 0
  on every pipeline stage; the embedding lives on the first stage, ln_f and lm_head on the last.
- Fused qkv per rank = cat(q_r, k_r, v_r) on dim 0. When n_kv < tp each rank holds one KV head,
  head r // (tp / n_kv) (TensorRT-LLM sizes the KV part as ceil(n_kv / tp) heads per rank).
- MLP: proj(silu(fc(x)) * gate(x)) with fc = gate_proj, gate = up_proj, both split on dim 0;
  proj = down_proj and dense = o_proj split on dim 1 (row-parallel, summed across ranks; their
  biases are added once, so they are replicated, not split).
- lm_head is a column-parallel layer over the vocabulary padded up to a multiple of tp.
- rotary_scaling is read by its `type` key; yarn's original_max_position_embeddings defaults to
  4096 and its attention factor is get_mscale(s, mscale) / get_mscale(s, mscale_all_dim);
  dynamic scaling rescales the base past max_position_embeddings (exactly transformers' rule) and
  recent versions require an `alpha` key for its short-sequence table.
- trtllm-build deduces max_seq_len as max_position_embeddings * factor for linear/dynamic/yarn,
  which is wrong for an extended model, so the build command always passes --max_seq_len.
"""

from __future__ import annotations

import json
import math
import shlex
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import Checkpoint, open_checkpoint, write_safetensors
from ..config import ModelConfig, ntk_theta
from ..describe import register_format
from ..errors import PizooError
from ..families import Tensor, qkv_blocks
from ..fsutil import atomic_dir, atomic_write_json, atomic_write_text, check_output, output_lock, read_json
from ..lineage import LOCAL_MODEL, model_identity

TP_SIZES = (1, 2, 4, 8)
PP_SIZES = (1, 2, 4)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
README_FILE = "README.md"


# ------------------------------------------------------------------------------------------------
# Validation: every refusal happens before anything is written.


def _fitting_sizes(sizes: tuple[int, ...], ok) -> str:
    good = [str(s) for s in sizes if ok(s)]
    return ", ".join(good) if good else "none"


def _shards_heads(cfg: ModelConfig, tp: int) -> bool:
    n_kv = cfg.num_kv_heads
    return cfg.num_heads % tp == 0 and (n_kv % tp == 0 or tp % n_kv == 0)


def check_exportable(cfg: ModelConfig, *, dtype: str, tp: int, pp: int, where: str = "config.json") -> None:
    """Raise PizooError (one line, naming the field and the fix) for anything TensorRT-LLM cannot
    represent faithfully."""
    if dtype not in DTYPES:
        raise PizooError(f"--dtype: '{dtype}' is not a TensorRT-LLM checkpoint dtype; use float16, bfloat16 or float32")
    if tp not in TP_SIZES:
        raise PizooError(f"--tp: {tp} is not supported; use one of {', '.join(map(str, TP_SIZES))}")
    if pp not in PP_SIZES:
        raise PizooError(f"--pp: {pp} is not supported; use one of {', '.join(map(str, PP_SIZES))}")
    if cfg.num_heads % tp:
        raise PizooError(f"{where}: num_attention_heads {cfg.num_heads} is not divisible by --tp {tp}; "
                         f"use --tp {_fitting_sizes(TP_SIZES, lambda t: cfg.num_heads % t == 0)}")
    n_kv = cfg.num_kv_heads
    if not _shards_heads(cfg, tp):
        raise PizooError(
            f"{where}: num_key_value_heads {n_kv} cannot be sharded over --tp {tp}: TensorRT-LLM splits KV "
            f"heads evenly or repeats each one tp/n_kv times, so tp must divide {n_kv} or be a multiple of it; "
            f"use --tp {_fitting_sizes(TP_SIZES, lambda t: _shards_heads(cfg, t))}")
    if cfg.intermediate_size % tp:
        raise PizooError(f"{where}: intermediate_size {cfg.intermediate_size} is not divisible by --tp {tp}; "
                         f"use --tp {_fitting_sizes(TP_SIZES, lambda t: cfg.intermediate_size % t == 0)}")
    if cfg.num_layers % pp:
        raise PizooError(f"{where}: num_hidden_layers {cfg.num_layers} cannot be split evenly into --pp {pp} "
                         f"pipeline stages; use --pp {_fitting_sizes(PP_SIZES, lambda p: cfg.num_layers % p == 0)}")
    if cfg.sliding_window_layers and cfg.sliding_window is not None and cfg.sliding_window < cfg.context_length:
        raise PizooError(
            f"{where}: sliding_window {cfg.sliding_window} is shorter than the context {cfg.context_length}, but a "
            "TensorRT-LLM checkpoint has no field for an attention window (it is a runtime setting), so the engine "
            "would attend past it; export with --to gguf, or set sliding_window to null if the model was trained "
            "with full attention")
    cfg.family.check_trtllm(cfg, where)  # a family TensorRT-LLM's format does not take is refused here
    trtllm_rope_fields(cfg, where)  # raises for scaling methods with no faithful TensorRT-LLM form


# ------------------------------------------------------------------------------------------------
# RoPE in TensorRT-LLM's terms


def _yarn_mscale(cfg: ModelConfig, where: str) -> float:
    """TensorRT-LLM scales cos/sin by get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) with
    get_mscale(s, m) = 0.1*m*ln(s) + 1. With mscale_all_dim = 0 the ratio is 0.1*mscale*ln(s) + 1,
    which expresses any attention factor a exactly: mscale = (a - 1) / (0.1 ln s)."""
    from ..rope import yarn_attention_factor

    rope = cfg.rope
    a = yarn_attention_factor(rope)
    if rope.factor <= 1.0:
        if not math.isclose(a, 1.0):
            raise PizooError(f"{where}: yarn with factor {rope.factor} and attention factor {a} has no TensorRT-LLM "
                             "form (its yarn temperature is 1 for factor <= 1); use a factor > 1")
        return 1.0
    return (a - 1.0) / (0.1 * math.log(rope.factor))


def trtllm_rope_fields(cfg: ModelConfig, where: str = "config.json") -> tuple[float, dict[str, Any] | None, int]:
    """(rotary_base, rotary_scaling, max_position_embeddings) for TensorRT-LLM's config.json.

    max_position_embeddings is the extended length (TensorRT-LLM's cos/sin table has that many rows
    and is indexed without a bound check), except for dynamic NTK, where TensorRT-LLM rescales the
    base past max_position_embeddings exactly as transformers does past L, so it must stay L.
    """
    rope = cfg.rope
    target = cfg.context_length
    allowed = cfg.family.trtllm_rope_types
    if allowed is not None and rope.type not in allowed:
        raise PizooError(f"{where}: '{rope.method}' scaling: {cfg.family.trtllm_rope_refusal}")
    if rope.method == "clex" or rope.type == "clex":
        raise PizooError(
            f"{where}: CLEX frequencies (baked as longrope factors) have no faithful TensorRT-LLM form for Llama: "
            "no config field takes per-frequency factors and its long_rope path is wired for Phi-3 only; export "
            "with --to gguf (rope_freqs carries the factors), or extend with yarn, linear or llama3 for TensorRT-LLM")
    if rope.type == "longrope":
        raise PizooError(
            f"{where}: longrope per-frequency factors have no faithful TensorRT-LLM form for Llama: no config field "
            "takes them and its long_rope path is wired for Phi-3 only; export with --to gguf, or extend with "
            "yarn, linear or llama3 for TensorRT-LLM")
    if rope.type == "none":
        return rope.theta, None, max(cfg.max_position_embeddings, target)
    if rope.type == "ntk":
        # Static NTK is exactly a changed base; TensorRT-LLM has no other field for it.
        return ntk_theta(rope.theta, rope.factor, cfg.rope_dim), None, target
    if rope.type == "linear":
        return rope.theta, {"type": "linear", "factor": rope.factor}, target
    if rope.type == "dynamic":
        # alpha = 1 keeps the short-sequence table unscaled (recent TensorRT-LLM asserts the key).
        return rope.theta, {"type": "dynamic", "factor": rope.factor, "alpha": 1.0}, rope.original_context
    if rope.type == "yarn":
        if not rope.truncate:
            raise PizooError(f"{where}: yarn with truncate=false has no TensorRT-LLM form (it always rounds the "
                             "correction range to whole dimensions); use truncate=true")
        return rope.theta, {
            "type": "yarn", "factor": rope.factor,
            # TensorRT-LLM's default (4096) is wrong for most models, so it is always written.
            "original_max_position_embeddings": rope.original_context,
            "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow,
            "mscale": _yarn_mscale(cfg, where), "mscale_all_dim": 0.0,
        }, target
    if rope.type == "llama3":
        return rope.theta, {
            "type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor, "original_max_position_embeddings": rope.original_context,
        }, target
    raise PizooError(f"{where}: RoPE type '{rope.type}' has no TensorRT-LLM form")


def trtllm_config(cfg: ModelConfig, *, dtype: str, tp: int, pp: int) -> dict[str, Any]:
    """TensorRT-LLM's config.json: only its own field names and enum values."""
    rotary_base, rotary_scaling, max_pos = trtllm_rope_fields(cfg)
    d: dict[str, Any] = {
        "architecture": cfg.family.check_trtllm(cfg, "config.json"),
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": max_pos,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_size": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "norm_epsilon": cfg.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rotary_base,
        "rotary_scaling": rotary_scaling,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "mlp_bias": False,
    }
    d.update(cfg.family.trtllm_fields(cfg, rotary_base))
    return d


# ------------------------------------------------------------------------------------------------
# The per-rank plan: which rows/columns of which HF tensor make each TensorRT-LLM tensor.


@dataclass(frozen=True)
class Piece:
    """Rows (dim 0) or columns (dim 1) [start, stop) of one HF tensor; rows past its end are zeros.
    `qkv_heads`: the rows are that many heads' [q_h | k_h | v_h], regrouped into Q|K|V blocks."""

    source: str
    dim: int
    start: int
    stop: int
    qkv_heads: int = 0


@dataclass(frozen=True)
class RankTensor:
    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]  # concatenated on dim 0


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    per = num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def rank_plan(cfg: ModelConfig, tp: int, pp: int, rank: int) -> list[RankTensor]:
    """Every tensor of rank{rank}.safetensors, in write order, with its shape and HF sources, from the
    family's tensor table (pizoo.families: each row's TensorRT-LLM name and split)."""
    tp_rank, pp_rank = rank % tp, rank // tp
    hd = cfg.head_dim
    if cfg.num_kv_heads >= tp:
        kv_rows = cfg.num_kv_heads // tp * hd
        kv_start = tp_rank * kv_rows
    else:  # each KV head serves tp / n_kv consecutive ranks
        kv_rows = hd
        kv_start = tp_rank // (tp // cfg.num_kv_heads) * hd
    layers = stage_layers(cfg.num_layers, pp, pp_rank)
    first, last = pp_rank == 0, pp_rank == pp - 1

    def piece(t, split: str) -> tuple[Piece, tuple[int, ...]]:
        """This rank's part of HF tensor t and its shape."""
        if split == "replicate":
            return Piece(t.hf, 0, 0, t.shape[0]), t.shape
        if split == "kv":
            return Piece(t.hf, 0, kv_start, kv_start + kv_rows), (kv_rows, *t.shape[1:])
        if split == "qkv_heads":  # this rank's heads are contiguous rows of the per-head layout
            n = t.shape[0] // tp
            return Piece(t.hf, 0, tp_rank * n, (tp_rank + 1) * n, cfg.num_heads // tp), (n, *t.shape[1:])
        if split == "cols":
            n = t.shape[1] // tp
            return Piece(t.hf, 1, tp_rank * n, (tp_rank + 1) * n), (t.shape[0], n)
        n = (padded_vocab(t.shape[0], tp) if split == "vocab" else t.shape[0]) // tp  # rows, q, vocab
        return Piece(t.hf, 0, tp_rank * n, (tp_rank + 1) * n), (n, *t.shape[1:])

    grouped: dict[str, tuple[list[Piece], list[tuple[int, ...]]]] = {}
    table = list(cfg.tensor_table())
    if cfg.tie_word_embeddings:
        # Written even when tied: the last stage may not hold the embedding, and a separate head
        # loads in every TensorRT-LLM version.
        emb = next(t for t in table if t.trt == "transformer.vocab_embedding.weight")
        table.append(Tensor(emb.hf, emb.shape, None, "lm_head.weight", "vocab"))
    # Write order: the embedding, the layers, then ln_f and lm_head.
    table.sort(key=lambda t: 1 if t.layer is not None else 0 if t.trt == "transformer.vocab_embedding.weight" else 2)
    for t in table:
        if t.trt is None:
            continue
        if t.layer is None:  # the embedding on the first stage, ln_f and lm_head on the last
            if not (first if t.trt == "transformer.vocab_embedding.weight" else last):
                continue
            name = t.trt
        elif t.layer in layers:
            name = t.trt.format(i=t.layer - layers.start)  # layer numbers restart on every stage
        else:
            continue
        p, shape = piece(t, t.split)
        pieces, shapes = grouped.setdefault(name, ([], []))
        pieces.append(p)
        shapes.append(shape)
    return [RankTensor(name, (sum(s[0] for s in shapes), *shapes[0][1:]), tuple(pieces))
            for name, (pieces, shapes) in grouped.items()]


# ------------------------------------------------------------------------------------------------
# Reading slices and streaming rank files


class _SliceReader:
    """Memory-mapped slices of the source tensors: only the requested rows/columns are read."""

    def __init__(self, ckpt: Checkpoint, stack: ExitStack):
        self.ckpt, self.stack = ckpt, stack
        self.handles: dict[Path, Any] = {}

    def read(self, piece: Piece) -> torch.Tensor:
        info = self.ckpt.tensors[piece.source]
        f = self.handles.get(info.file)
        if f is None:
            f = self.handles[info.file] = self.stack.enter_context(safe_open(str(info.file), framework="pt"))
        sl = f.get_slice(piece.source)
        size = info.shape[piece.dim]
        stop = min(piece.stop, size)
        t = sl[piece.start:stop] if piece.dim == 0 else sl[:, piece.start:stop]
        if piece.stop > size:  # lm_head rows past the vocabulary: zero padding
            t = torch.cat([t, t.new_zeros((piece.stop - stop, *t.shape[1:]))], dim=0)
        return t


def _materialise(reader: _SliceReader, entry: RankTensor, dtype: torch.dtype) -> torch.Tensor:
    parts = [qkv_blocks(reader.read(p), p.qkv_heads) if p.qkv_heads else reader.read(p) for p in entry.pieces]
    src = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    out = src.to(dtype).contiguous()
    if tuple(out.shape) != entry.shape:
        raise PizooError(f"{entry.name}: built shape {list(out.shape)} but expected {list(entry.shape)}; "
                         "the source checkpoint does not match its config.json")
    if dtype == torch.float16 and src.dtype != torch.float16 and torch.isinf(out).any() and not torch.isinf(src).any():
        raise PizooError(f"{entry.pieces[0].source}: values exceed the float16 range (max 65504) and would become "
                         "inf in the engine; use --dtype bfloat16 or float32")
    return out


def _write_rank_file(path: Path, plan: list[RankTensor], reader: _SliceReader, dtype: torch.dtype, bar) -> None:
    """Write one safetensors file tensor by tensor: the header is known from the plan (the layout
    up front), so only one tensor is ever held in memory (save_file would need the whole rank)."""

    def tensors():
        for entry in plan:
            t = _materialise(reader, entry, dtype)
            yield entry.name, t
            bar.update(t.numel() * t.element_size())
            del t

    write_safetensors(path, tensors(), layout=[(entry.name, dtype, entry.shape) for entry in plan])


def default_output(src: Path, dtype: str, tp: int, pp: int) -> Path:
    return Path.cwd() / f"{src.name}-trtllm-{dtype}-tp{tp}-pp{pp}"


def export_trtllm(src: str | Path, out: str | Path | None = None, *, dtype: str = "float16", tp: int = 1, pp: int = 1,
                  overwrite: bool = False, progress: bool = False) -> Path:
    """Write a TensorRT-LLM checkpoint for the HF folder `src`; returns the output folder.

    Ranks are written one after another, each streamed tensor by tensor from memory-mapped slices,
    so peak memory is about one tensor (the largest: the embedding) whatever the model size or tp/pp.
    The folder appears only when complete.
    """
    src = Path(src)
    ckpt = open_checkpoint(src)
    cfg = ckpt.config
    check_exportable(cfg, dtype=dtype, tp=tp, pp=pp, where=str(src / "config.json"))
    out = check_output(Path(out) if out is not None else default_output(src, dtype, tp, pp), overwrite=overwrite,
                       inputs=[src])
    torch_dtype = DTYPES[dtype]
    world = tp * pp
    plans = [rank_plan(cfg, tp, pp, r) for r in range(world)]
    item = torch.empty((), dtype=torch_dtype).element_size()
    total = sum(math.prod(e.shape) * item for plan in plans for e in plan)
    with output_lock(out), atomic_dir(out, overwrite=overwrite) as tmp, ExitStack() as stack:
        reader = _SliceReader(ckpt, stack)
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc=f"trtllm tp{tp} pp{pp}",
                                       disable=not progress, leave=False))
        for rank, plan in enumerate(plans):
            _write_rank_file(tmp / f"rank{rank}.safetensors", plan, reader, torch_dtype, bar)
        atomic_write_json(tmp / "config.json", {**trtllm_config(cfg, dtype=dtype, tp=tp, pp=pp),
                                                **lineage_fields(cfg, src)})
        atomic_write_text(tmp / README_FILE, _readme(tmp, out, src, cfg))
    return out


# ------------------------------------------------------------------------------------------------
# Build command, model-card text, inspect


def checkpoint_context_length(config: dict[str, Any]) -> int:
    """The sequence length the checkpoint is meant to serve: max_position_embeddings, or for dynamic
    NTK (where that field is the original length L) L * factor."""
    max_pos = int(config["max_position_embeddings"])
    scaling = config.get("rotary_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) == "dynamic":
        return int(round(max_pos * float(scaling.get("factor", 1.0))))
    return max_pos


def _read_trtllm_config(ckpt_dir: Path) -> dict[str, Any]:
    config = read_json(ckpt_dir / "config.json", "TensorRT-LLM config.json")
    for key in ("architecture", "mapping", "max_position_embeddings"):
        if key not in config:
            raise PizooError(f"{ckpt_dir / 'config.json'}: missing '{key}'; is this a TensorRT-LLM checkpoint?")
    return config


def build_command_for(ckpt_dir: str | Path, config: dict[str, Any]) -> str:
    n = checkpoint_context_length(config)
    world = int(config["mapping"].get("world_size", 1))
    ckpt = str(ckpt_dir)
    parts = ["trtllm-build", "--checkpoint_dir", shlex.quote(ckpt),
             "--output_dir", shlex.quote(ckpt.rstrip("/") + "-engine"),
             # Explicit lengths: trtllm-build would otherwise deduce max_position_embeddings * factor
             # and cap prompts at 1024 tokens.
             "--max_seq_len", str(n), "--max_input_len", str(n), "--max_num_tokens", str(n)]
    if world > 1:
        parts += ["--workers", str(world)]  # build the tp*pp rank engines in parallel
    return " ".join(parts)


def trtllm_build_command(ckpt_dir: str | Path) -> str:
    """The exact trtllm-build command for a checkpoint folder written by export_trtllm."""
    return build_command_for(ckpt_dir, _read_trtllm_config(Path(ckpt_dir)))


def _rope_summary(config: dict[str, Any]) -> dict[str, Any]:
    scaling = dict(config.get("rotary_scaling") or {})
    rtype = scaling.pop("type", scaling.pop("rope_type", "none"))
    out = {"type": rtype, "factor": float(scaling.pop("factor", 1.0)), "theta": config.get("rotary_base", 10000.0),
           "original_context": scaling.pop("original_max_position_embeddings", None)}
    if rtype in ("none", "dynamic"):
        out["original_context"] = config["max_position_embeddings"]
    elif rtype == "linear":
        out["original_context"] = int(round(config["max_position_embeddings"] / out["factor"]))
    out.update(scaling)
    return out


def trtllm_card_section(ckpt_dir: str | Path) -> str:
    """Markdown for a model card: how to build and run the engine from this checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    config = _read_trtllm_config(ckpt_dir)
    return _card_text(ckpt_dir, config)


def _card_text(ckpt_dir: str | Path, config: dict[str, Any]) -> str:
    m = config["mapping"]
    world = int(m.get("world_size", 1))
    rope = _rope_summary(config)
    run = ("python3 examples/run.py" if world == 1 else f"mpirun -n {world} python3 examples/run.py")
    return "\n".join([
        "## TensorRT-LLM",
        "",
        f"TensorRT-LLM checkpoint: {config['architecture']}, {config['dtype']}, "
        f"tensor parallel {m.get('tp_size', 1)} x pipeline parallel {m.get('pp_size', 1)} "
        f"({world} rank file{'s' if world > 1 else ''}), context {checkpoint_context_length(config)} tokens, "
        f"RoPE {rope['type']} (factor {rope['factor']:g}, base {rope['theta']:g}).",
        "",
        "Build the engine (needs TensorRT-LLM and an NVIDIA GPU per rank):",
        "",
        "```bash",
        build_command_for(ckpt_dir, config),
        "```",
        "",
        f"Run it with TensorRT-LLM's example runner, e.g. `{run} --engine_dir {str(ckpt_dir).rstrip('/')}-engine "
        "--tokenizer_dir <the HF model folder> --input_text \"...\"`.",
        "",
    ])


def lineage_fields(cfg: ModelConfig, src: Path) -> dict[str, Any]:
    """An extended model's base by public identity (pizoo.lineage), as a `pizoo` key of config.json:
    TensorRT-LLM's PretrainedConfig keeps keys it does not know as attributes (with a warning)."""
    if not cfg.rope.is_scaled:
        return {}
    ident = model_identity(cfg.raw, src)
    block = cfg.raw.get("pizoo") or {}
    out = {"base_model": ident.label, "base_identity": ident.to_dict(), "base_sha256": block.get("base_sha256")}
    return {"pizoo": {k: v for k, v in out.items() if v}}


def _readme(tmp: Path, out: Path, src: Path, cfg: ModelConfig) -> str:
    """The checkpoint's README: what it was made from by public identity (pizoo.lineage; never a local
    path, since the folder may be published) and the build command relative to the folder holding it."""
    config = read_json(tmp / "config.json", "config.json")
    ident = model_identity(cfg.raw, src)
    made_from = f"[{ident.hub_id}]({ident.repo_url})" if ident.hub_id else ident.name or LOCAL_MODEL
    what = "an extension of" if cfg.rope.is_scaled else "a conversion of"
    return "\n".join([
        f"# {out.name}",
        "",
        f"Written by pizoo {__version__}: {what} {made_from} ({cfg.architecture}, RoPE {cfg.rope.method}). "
        "trtllm-build reads only config.json and rank*.safetensors; this file is for people.",
        "",
        "Run the commands below from the folder that holds this checkpoint.",
        "",
        _card_text(Path(out.name), config),
    ])


def is_trtllm_checkpoint(path: Path) -> bool:
    if not (path.is_dir() and (path / "config.json").is_file() and (path / "rank0.safetensors").is_file()):
        return False
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "architecture" in config and isinstance(config.get("mapping"), dict)


def _logical_params(config: dict[str, Any]) -> int:
    h, v, n = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    hd = config.get("head_size") or h // config["num_attention_heads"]
    q, kv, inter = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd, config["intermediate_size"]
    mlp_mats = 3 if config.get("hidden_act", "silu") == "silu" else 2  # gated (SwiGLU) or plain (GPT-NeoX)
    per_layer = 2 * h + h * (q + 2 * kv) + q * h + mlp_mats * h * inter
    if config.get("attn_bias"):
        per_layer += q + 2 * kv + (0 if config.get("qwen_type") else h)
    if config.get("bias"):  # biases everywhere (GPT-NeoX): qkv, dense, both norms, fc, proj
        per_layer += q + 2 * kv + h + 2 * h + inter + h
    return v * h * (1 if config.get("tie_word_embeddings") else 2) + h + n * per_layer


def describe_trtllm(path: Path) -> dict[str, Any]:
    config = _read_trtllm_config(path)
    m = config["mapping"]
    world = int(m.get("world_size", 1))
    rope = _rope_summary(config)
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    info: dict[str, Any] = {
        "format": "trtllm",
        "path": str(path),
        "architecture": config["architecture"],
        "params": _logical_params(config),
        "dtype": config.get("dtype"),
        "context_length": checkpoint_context_length(config),
        "original_context_length": rope["original_context"],
        "rope": rope,
        "mapping": f"tp {m.get('tp_size', 1)} x pp {m.get('pp_size', 1)} ({world} ranks)",
        "tp_size": m.get("tp_size", 1),
        "pp_size": m.get("pp_size", 1),
        "world_size": world,
        "layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "heads": config["num_attention_heads"],
        "kv_heads": config["num_key_value_heads"],
        "head_dim": config.get("head_size"),
        "vocab_size": config["vocab_size"],
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        "build_command": build_command_for(path, config),
        "files": files,
        "total_bytes": sum(files.values()),
    }
    missing = [f"rank{r}.safetensors" for r in range(world) if f"rank{r}.safetensors" not in files]
    if missing:
        info["warnings"] = [f"missing {', '.join(missing)}: the checkpoint is incomplete; re-export it"]
    return info


register_format("trtllm", is_trtllm_checkpoint, describe_trtllm, before="hf")
