"""The calibration fine-tune: teach a model its new RoPE scale (`pizoo calibrate`).

One engine runs a tiny model on a CPU in CI and a 13B model on 8 GPUs:

- AdamW; linear warmup from `warmup_start` (10%) of the peak lr, then constant or cosine; gradient
  accumulation up to the recipe's global batch (in sequences); gradient clipping at 1.0.
- GPU: float32 master weights, bf16 autocast (and FSDP bf16 mixed precision), SDPA flash attention.
  CPU: float32 throughout, deterministic (tests rely on bit-identical resume).
- Chunked cross-entropy: the head and the loss run `loss_chunk` positions at a time under
  activation checkpointing, so neither forward nor backward holds [T, vocab] float32 logits.
- Short-sequence calibration (train_len < ctx): position ids are spread over the target range, PoSE
  style (two chunks, the second shifted by a random skip) or sorted random positions (CLEX style).
- Under torchrun (WORLD_SIZE > 1): each decoder layer and then the whole model are sharded with
  FSDP2 `fully_shard` over NCCL (GPU) or gloo (CPU). All ranks read the same deterministic sequence
  stream and keep every world_size-th sequence of each global batch. Training checkpoints are
  sharded (below); the final folder is gathered one tensor at a time and written by rank 0 only.
- Robustness: an atomic checkpoint every `checkpoint_every` steps (model, optimizer, RNG, data
  position, metrics) in `<out>.calibrate-state/`; resume continues exactly (same data, optimizer
  and RNG state; bit-identical on CPU); Ctrl-C saves and raises `Interrupted`; a NaN/inf loss stops
  with a clear message and keeps the last good checkpoint; tqdm shows loss, tokens/s and ETA;
  metrics.jsonl gets one line per step (copied into the output folder at the end).

Checkpoint layout, `<out>.calibrate-state/step-NNNNNNN/`:

- single process: model.safetensors, optimizer.safetensors + optimizer.json, rng.safetensors,
  trainer.json (full tensors; the process holds the whole model anyway).
- under torchrun (sharded): rank{R}.safetensors per rank, holding that rank's local FSDP shards of
  every parameter and of AdamW's exp_avg / exp_avg_sq, the `step` counters and the rank's RNG
  state (`rng::cpu`, `rng::cuda`), streamed to disk one tensor at a time; manifest.json (world
  size, step, data position, param groups, each rank's file and RNG tensors, and for every tensor
  its global shape and each rank's row range: FSDP2 shards dim 0 in rank order); trainer.json.
  All ranks write into `.step-NNNNNNN.tmp/`; after a barrier rank 0 checks every rank's header,
  writes the manifest and renames the folder into place, so a step folder exists only complete.
  A resume on another world size (or a single process) reassembles each rank's rows from the
  saved row ranges; the values are copied exactly, only the later reduction order differs.

Checkpoint files are safetensors plus JSON; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import __version__
from .errors import Interrupted, PizooError
from .fsutil import atomic_dir, atomic_write_json, check_output, output_lock, read_json, sha256_file, writing
from .model import softcap

STATE_SUFFIX = ".calibrate-state"
MANIFEST_FILE = "manifest.json"  # present only in sharded (torchrun) training checkpoints
SHARDED_FORMAT = "pizoo.sharded-training-state"
SHARDED_FORMAT_VERSION = 1
DEFAULT_CHECKPOINT_EVERY = 50
DEFAULT_LOSS_CHUNK = 1024
FULL_HASH_LIMIT = 2 << 30  # hash whole weight files up to 2 GiB; larger bases hash their headers


@dataclass
class CalibrationResult:
    out: Path
    method: str
    factor: float
    ctx: int
    steps: int
    tokens: int
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    duration_s: float = 0.0


# ------------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this call initialised the process group (and tears it down)
    offload: bool = False  # FSDP2 keeps the sharded state in host memory (CPUOffloadPolicy)

    @property
    def fsdp(self) -> bool:
        """Whether the model is sharded with FSDP2: several processes, or one that offloads."""
        return self.world > 1 or self.offload

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_mean(self, value: float, device: torch.device) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool, device: torch.device) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather_ints(self, values: list[int], device: torch.device) -> list[list[int]]:
        """Every rank's `values` (the same length on all ranks), indexed by rank."""
        if self.world == 1:
            return [list(values)]
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        return [part.tolist() for part in parts]


def _init_distributed(device: str | None, offload: bool = False) -> tuple[_Dist, torch.device]:
    """The process group: torchrun's, or (offload without torchrun) a one-process group, since
    FSDP2 and its CPU offload need one; none for a plain single-process run."""
    from .options import check_device

    device = check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if world <= 1 and not offload:
        return _Dist(), torch.device(device or ("cuda" if use_cuda else "cpu"))
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owned = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        backend = "nccl" if use_cuda else "gloo"
        if world <= 1:  # no torchrun: an in-process store, nothing listens on the network
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend)
        owned = True
    d = _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, owned=owned, offload=offload)
    return d, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


# ------------------------------------------------------------------------------------------------
# Learning rate and positions


def lr_at(step: int, *, peak: float, warmup: int, total: int, start: float, schedule: str,
          min_ratio: float = 0.0) -> float:
    """Linear warmup from start*peak to peak over `warmup` steps, then constant or cosine to min_ratio*peak."""
    if warmup > 0 and step < warmup:
        return peak * (start + (1 - start) * step / warmup)
    if schedule == "cosine" and total > warmup:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return peak


def _seed_int(*parts: Any) -> int:
    digest = hashlib.sha1(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)



def _generator(*parts: Any) -> torch.Generator:
    """A generator seeded from `parts`: identical on every rank, world size and resume."""
    return torch.Generator().manual_seed(_seed_int(*parts))


def pose_positions(length: int, target: int, gen: torch.Generator) -> torch.Tensor:
    """PoSE skip-wise positions: two chunks; the second one shifted by a random skip so the ids span
    up to `target`. Relative distances inside each chunk stay real; across chunks they are long."""
    if length >= target:
        return torch.arange(length)
    split = int(torch.randint(1, length, (1,), generator=gen))
    skip = int(torch.randint(0, target - length + 1, (1,), generator=gen))
    pos = torch.arange(length)
    pos[split:] += skip
    return pos


def sorted_random_positions(length: int, span: int, gen: torch.Generator) -> torch.Tensor:
    """CLEX-style positions: 0, span-1 and length-2 distinct sorted random ids in between."""
    if length >= span:
        return torch.arange(length)
    inner = torch.randperm(span - 2, generator=gen)[:length - 2] + 1
    return torch.cat([torch.tensor([0]), inner.sort().values, torch.tensor([span - 1])])


# ------------------------------------------------------------------------------------------------
# The loss module (FSDP root): forward + chunked cross-entropy in one module call


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    # the final-logit soft cap (Gemma 2) as the model's own head applies it
    return F.cross_entropy(softcap(F.linear(hidden, weight).float(), cap), targets, reduction="sum")


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy, the head applied `chunk` positions at a time.

    Each chunk runs under activation checkpointing, so backward recomputes its logits instead of
    keeping [T, vocab] float32 logits alive. Computing the loss inside the module's forward keeps
    the head weight gathered while it is used when the module is FSDP-sharded.
    """

    def __init__(self, lm: nn.Module, chunk: int = DEFAULT_LOSS_CHUNK):
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.lm(input_ids, position_ids)
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1)
        w, cap = self.lm.head_weight, self.lm.config.final_logit_softcap
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], self.chunk):
            total = total + checkpoint(_ce_sum, h[s:s + self.chunk], w, t[s:s + self.chunk], cap, use_reentrant=False)
        return total / t.numel()


# ------------------------------------------------------------------------------------------------
# Model construction and state


def _build_training_model(cfg, rope, ctx: int, dev: torch.device, dist_: _Dist, seed: int,
                          activation_checkpointing: bool, loss_chunk: int, lora=None):
    """Meta-device build, LoRA adapters when asked, optional FSDP sharding, then materialise on `dev`.

    With LoRA on a GPU the frozen base weights are kept in bf16 from the start (never materialised
    in float32): only the trainable parameters get float32 master weights, gradients and AdamW state.
    """
    from .model import LlamaModel

    train_cfg = cfg.with_rope(rope, ctx)
    with torch.device("meta"):
        lm = LlamaModel(train_cfg)
        if rope.method == "clex":
            from .clex import clex_module_for

            lm.rotary.set_frequency_module(clex_module_for(rope, cfg.rope_dim))
    if lora is not None:
        from .lora import apply_lora

        apply_lora(lm, lora)
        if dev.type == "cuda":
            for p in lm.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    lm.activation_checkpointing = activation_checkpointing
    wrapper = CausalLMLoss(lm, loss_chunk)
    if dist_.fsdp:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if dev.type == "cuda" else MixedPrecisionPolicy())
        # --offload: FSDP2's own policy keeps parameters, gradients and so AdamW's state on the CPU
        # and copies each layer to the device for its forward and backward.
        offload = CPUOffloadPolicy(pin_memory=dev.type == "cuda") if dist_.offload else OffloadPolicy()
        for layer in lm.model.layers:
            fully_shard(layer, mp_policy=mp, offload_policy=offload)
        fully_shard(wrapper, mp_policy=mp, offload_policy=offload)
    # FSDP2's CPU offload wants the sharded parameters materialised in host memory.
    wrapper.to_empty(device="cpu" if dist_.offload else dev)
    if rope.method == "clex":
        # The ODE's initial weights, identical on every rank (seeded), loaded like any weight.
        from .clex import clex_module_for

        torch.manual_seed(seed)
        init = clex_module_for(rope, cfg.rope_dim).state_dict()
        _load_full(wrapper, {f"lm.rotary.learned.{k}": v for k, v in init.items()}, strict=False)
    if lora is not None:
        from .lora import init_adapter_weights

        _load_full(wrapper, {f"lm.{k}": v for k, v in init_adapter_weights(lm, _seed_int(seed, "lora")).items()},
                   strict=False)
    return wrapper


def _trainable(wrapper: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (all of them in a full fine-tune), by wrapper name."""
    return {n: p for n, p in wrapper.named_parameters() if p.requires_grad}


def _load_full(wrapper: nn.Module, tensors, *, strict: bool = True) -> None:
    """Copy full tensors (by wrapper name) into the parameters, sharded or not, one at a time."""
    params = dict(wrapper.named_parameters())
    seen = set()
    for name, full in (tensors.items() if isinstance(tensors, dict) else tensors):
        p = params.get(name)
        if p is None:
            continue
        seen.add(name)
        with torch.no_grad():
            full = full.to(device=p.device, dtype=p.dtype)
            if hasattr(p, "device_mesh"):  # an FSDP2 DTensor: keep this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(full)
    if strict:
        missing = [n for n in params if n not in seen]
        if missing:
            raise PizooError(f"checkpoint: no weights for '{missing[0]}'; the base checkpoint is incomplete")


def _load_base_weights(wrapper: nn.Module, ckpt) -> None:
    from .lora import is_lora_param

    _load_full(wrapper, ((f"lm.{name}", t) for name, t in ckpt.iter_model_tensors()), strict=False)
    expected = {n for n, _ in wrapper.named_parameters() if not n.startswith("lm.rotary.") and not is_lora_param(n)}
    loaded = {f"lm.{ckpt.config.family.model_name(n)}" for n in ckpt.tensors}
    missing = sorted(expected - loaded)
    if missing:
        raise PizooError(f"{ckpt.path}: no weights for '{missing[0][3:]}'; the base checkpoint is incomplete")


def _full_optimizer_state(wrapper: nn.Module, opt) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as (flat tensors, JSON-able rest), keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(wrapper, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pname, st in osd.get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pname}::{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(pname, {})[k] = v
    return tensors, {"param_groups": osd.get("param_groups", []), "scalars": scalars}


def _gathered_state(wrapper: nn.Module, keep) -> Iterator[tuple[str, torch.Tensor]]:
    """The wrapper's state-dict entries whose name passes `keep`, as full CPU tensors, one at a time.

    Under FSDP each entry is all-gathered when it is reached, so every rank must run this generator
    to the end in step with the others (rank 0 writes what it yields; the other ranks drain it).
    Peak memory is one full tensor, never the model.
    """
    for name, t in wrapper.state_dict().items():
        if not keep(name):
            continue
        if hasattr(t, "full_tensor"):  # an FSDP2 DTensor shard
            t = t.full_tensor()
        yield name, t.detach().to("cpu")


def _set_optimizer_state(wrapper: nn.Module, opt, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state: dict[str, dict[str, Any]] = {}
    for key, v in tensors.items():
        pname, k = key.rsplit("::", 1)
        state.setdefault(pname, {})[k] = v
    for pname, extra in meta.get("scalars", {}).items():
        state.setdefault(pname, {}).update(extra)
    set_optimizer_state_dict(wrapper, opt, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------------------------
# Training-state checkpoints (<out>.calibrate-state/step-NNNNNNN/)


def state_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}{STATE_SUFFIX}"


def _latest_checkpoint(state_dir: Path) -> Path | None:
    steps = sorted(state_dir.glob("step-*/trainer.json"))
    return steps[-1].parent if steps else None


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def _set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "cpu" in tensors:
        torch.set_rng_state(tensors["cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _save_checkpoint(state_dir: Path, step: int, wrapper: nn.Module, opt, trainer: dict, dist_: _Dist,
                     dev: torch.device) -> None:
    """One training checkpoint, written atomically: sharded per rank under FSDP, else full tensors."""
    if dist_.fsdp:
        _save_sharded_checkpoint(state_dir, step, wrapper, opt, trainer, dist_, dev)
    else:
        _save_full_checkpoint(state_dir, step, wrapper, opt, trainer)


def _load_checkpoint(path: Path, wrapper: nn.Module, opt, dist_: _Dist, dev: torch.device) -> dict:
    """Restore a checkpoint of either layout, on any world size; returns trainer.json."""
    if (path / MANIFEST_FILE).is_file():
        return _load_sharded_checkpoint(path, wrapper, opt, dist_, dev)
    return _load_full_checkpoint(path, wrapper, opt)


def _drop_older_checkpoints(state_dir: Path, keep: Path) -> None:
    for old in state_dir.glob("step-*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _holds_no_checkpoint(state_dir: Path) -> bool:
    """A state folder a failed or killed start left: pizoo's own entries only (metrics.jsonl and step
    folders) and no complete checkpoint to resume from."""
    names = [p.name for p in state_dir.iterdir()]
    ours = all(n == "metrics.jsonl" or re.fullmatch(r"\.?step-\d+(\.tmp|\.old)?", n) for n in names)
    return ours and _latest_checkpoint(state_dir) is None


def _remove_unfinished_saves(state_dir: Path) -> None:
    """Temporary step folders of a save that was killed midway (never valid checkpoints)."""
    for stale in state_dir.glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _save_full_checkpoint(state_dir: Path, step: int, wrapper: nn.Module, opt, trainer: dict) -> None:
    """Single process: full tensors in one atomic folder, then drop older ones."""
    from safetensors.torch import save_file

    trainable = _trainable(wrapper)
    model_sd = dict(_gathered_state(wrapper, lambda n: n in trainable))
    opt_tensors, opt_meta = _full_optimizer_state(wrapper, opt)
    final = state_dir / f"step-{step:07d}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(model_sd, str(tmp / "model.safetensors"))
        save_file(opt_tensors or {"__empty__": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "optimizer.json", opt_meta)
        atomic_write_json(tmp / "trainer.json", trainer)
    _drop_older_checkpoints(state_dir, final)


def _load_full_checkpoint(path: Path, wrapper: nn.Module, opt) -> dict:
    """A single-process checkpoint; under FSDP each rank keeps its shard of every full tensor."""
    from safetensors.torch import load_file

    trainer = read_json(path / "trainer.json", "trainer state")
    model_sd = load_file(str(path / "model.safetensors"))
    missing = [n for n in _trainable(wrapper) if n not in model_sd]
    if missing:
        raise PizooError(f"{path / 'model.safetensors'}: no saved state for '{missing[0]}'; the checkpoint does not "
                         "match this run, pass --no-resume to start over")
    _load_full(wrapper, model_sd, strict=False)
    opt_tensors = {k: v for k, v in load_file(str(path / "optimizer.safetensors")).items() if k != "__empty__"}
    _set_optimizer_state(wrapper, opt, opt_tensors, read_json(path / "optimizer.json", "optimizer state"))
    _set_rng_state(load_file(str(path / "rng.safetensors")))
    return trainer


# ------------------------------------------------------------------------------------------------
# Sharded training checkpoints (torchrun): rank{R}.safetensors per rank + manifest.json


def _rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def _local_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor: the local shard of an FSDP2 DTensor, else the tensor itself."""
    return t.to_local() if hasattr(t, "device_mesh") else t


def _shard_layout(params: dict[str, torch.Tensor], dist_: _Dist, dev: torch.device) -> dict[str, dict]:
    """Which rows of dim 0 each rank holds, per parameter: {"placement", "shards": [{rank, offset, rows}]}.

    FSDP2 splits dim 0 of every parameter over a 1-D mesh in rank order, so a rank's offset is the
    sum of the rows held by the ranks before it; one all_gather of the local row counts gives all.
    Plain tensors (a single process) are held whole by every rank.
    """
    from torch.distributed.tensor import Shard

    names = list(params)
    for name in names:
        t = params[name]
        if hasattr(t, "device_mesh") and (t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),)
                                          or list(t.device_mesh.get_coordinate() or ()) != [dist_.rank]):
            raise PizooError(f"{name}: sharded as {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh; pizoo's "
                             "sharded checkpoints need FSDP2's default layout (dim 0 split over ranks in order)")
    sharded = [hasattr(params[n], "device_mesh") for n in names]
    local = [_local_rows(params[n]).shape[0] if s else 0 for n, s in zip(names, sharded)]
    by_rank = dist_.all_gather_ints(local, dev) if any(sharded) else [local] * dist_.world
    layout: dict[str, dict] = {}
    for i, name in enumerate(names):
        full_rows = params[name].shape[0] if params[name].ndim else None
        if not sharded[i]:
            layout[name] = {"placement": "Replicate()",
                            "shards": [{"rank": r, "offset": 0, "rows": full_rows} for r in range(dist_.world)]}
            continue
        shards, offset = [], 0
        for r in range(dist_.world):
            shards.append({"rank": r, "offset": offset, "rows": by_rank[r][i]})
            offset += by_rank[r][i]
        if offset != full_rows:
            raise PizooError(f"{name}: the ranks hold {offset} of its {full_rows} rows; FSDP sharding is inconsistent")
        layout[name] = {"placement": "Shard(0)", "shards": shards}
    return layout


def _rank_rng_state(dev: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng::cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        out["rng::cuda"] = torch.cuda.get_rng_state(dev)
    return out


def _rank_entries(params: dict[str, torch.Tensor], opt) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) of everything one rank saves: parameters, then AdamW state as `NAME::exp_avg` etc.

    Tensors are returned as they live (DTensors stay DTensors) so the manifest can tell sharded
    from replicated ones; the writer takes each one's local rows.
    """
    entries = [(name, p) for name, p in params.items()]
    for name, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                entries.append((f"{name}::{k}", v))
    return entries


def _optimizer_scalars(params: dict[str, torch.Tensor], opt) -> dict[str, dict[str, Any]]:
    """Non-tensor optimizer state (none for AdamW today), kept so nothing is silently dropped."""
    out: dict[str, dict[str, Any]] = {}
    for name, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            if not isinstance(v, torch.Tensor):
                out.setdefault(name, {})[k] = v
    return out


def _write_safetensors_streamed(path: Path, entries: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file written one tensor at a time (one device-to-host copy each), then fsynced.

    safetensors' save_file needs every tensor on the host at once: a rank's whole shard of the
    model and optimizer. The header is known from shapes alone (the layout given up front), so each
    tensor goes straight to its offset.
    """
    from .checkpoint import write_safetensors

    try:
        write_safetensors(path, entries, layout=[(key, t.dtype, tuple(t.shape)) for key, t in entries])
    except OSError as e:
        raise PizooError(f"{path}: cannot write this rank's checkpoint shard ({e.strerror}); the state folder must "
                         "be writable, have space, and be on a file system every node shares") from None


def _sharded_manifest(tmp: Path, step: int, trainer: dict, entries: list[tuple[str, torch.Tensor]],
                      layout: dict[str, dict], params: dict[str, torch.Tensor], opt, world: int) -> dict:
    """The manifest, built after every rank wrote its file; each rank's header is checked against it."""
    from .checkpoint import TORCH_TO_ST, read_safetensors_header

    tensors: dict[str, dict] = {}
    for key, t in entries:
        owner = key.split("::", 1)[0]
        if hasattr(t, "device_mesh"):  # a parameter or an AdamW moment: rows as the parameter's
            tensors[key] = {"shape": list(t.shape), "dtype": TORCH_TO_ST[t.dtype], **layout[owner]}
        else:  # AdamW's step counter (0-dim, the same on every rank) or a single-process tensor
            tensors[key] = {"shape": list(t.shape), "dtype": TORCH_TO_ST[t.dtype], "placement": "Replicate()"}
    ranks = []
    for r in range(world):
        path = tmp / _rank_file(r)
        if not path.is_file():
            raise PizooError(f"{path}: rank {r} wrote no checkpoint shard here; the state folder must be on a file "
                             "system every node shares")
        header = read_safetensors_header(path)
        for key, meta in tensors.items():
            got = header.get(key)
            want = list(meta["shape"])
            if meta["placement"] == "Shard(0)":
                want[0] = meta["shards"][r]["rows"]
            if got is None or list(got.shape) != want:
                raise PizooError(f"{path}: '{key}' has shape {None if got is None else list(got.shape)}, expected "
                                 f"{want}; the save is inconsistent, rerun to save again")
        ranks.append({"rank": r, "file": path.name, "bytes": path.stat().st_size,
                      "rng": sorted(k for k in header if k.startswith("rng::"))})
    return {
        "format": SHARDED_FORMAT,
        "format_version": SHARDED_FORMAT_VERSION,
        "step": step,
        "data_position": trainer["data_position"],
        "world_size": world,
        "ranks": ranks,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "optimizer_scalars": _optimizer_scalars(params, opt),
        "tensors": tensors,
    }


def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place in one step (an existing one is moved aside first)."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_sharded_checkpoint(state_dir: Path, step: int, wrapper: nn.Module, opt, trainer: dict, dist_: _Dist,
                             dev: torch.device) -> None:
    """Every rank streams its own shards into `.step-N.tmp/rank{R}.safetensors`; after a barrier
    rank 0 checks the headers, writes manifest.json and trainer.json, and renames the folder into
    place, so `step-N/` only ever exists complete. No rank ever holds more than its shard. Only
    trainable parameters are saved (the frozen base is read from the base model on resume)."""
    params = _trainable(wrapper)
    layout = _shard_layout(params, dist_, dev)
    final = state_dir / f"step-{step:07d}"
    tmp = state_dir / f".{final.name}.tmp"
    if dist_.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed midway
        tmp.mkdir(parents=True)
    dist_.barrier()
    entries = _rank_entries(params, opt)
    local = [(key, _local_rows(t)) for key, t in entries] + list(_rank_rng_state(dev).items())
    _write_safetensors_streamed(tmp / _rank_file(dist_.rank), local)
    dist_.barrier()
    if dist_.is_main:
        manifest = _sharded_manifest(tmp, step, trainer, entries, layout, params, opt, dist_.world)
        atomic_write_json(tmp / "trainer.json", trainer)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)  # written last: the folder is complete
        _publish_dir(tmp, final)
        _drop_older_checkpoints(state_dir, final)
    dist_.barrier()


def _read_manifest(path: Path) -> dict:
    manifest = read_json(path / MANIFEST_FILE, "sharded checkpoint manifest")
    where = path / MANIFEST_FILE
    if manifest.get("format") != SHARDED_FORMAT or manifest.get("format_version") != SHARDED_FORMAT_VERSION:
        raise PizooError(f"{where}: format {manifest.get('format')!r} version {manifest.get('format_version')!r} is "
                         f"not {SHARDED_FORMAT} v{SHARDED_FORMAT_VERSION}; pass --no-resume to start over")
    for key, kind in (("world_size", int), ("ranks", list), ("tensors", dict), ("param_groups", list)):
        if not isinstance(manifest.get(key), kind):
            raise PizooError(f"{where}: field '{key}' is missing or not a {kind.__name__}; the checkpoint is "
                             "damaged, pass --no-resume to start over")
    return manifest


class _ShardReader:
    """The saved rank files of one checkpoint, memory-mapped on first use, read as row ranges."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self._open: dict[int, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "_ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def file(self, rank: int):
        from safetensors import safe_open

        if rank not in self._open:
            f = self.path / _rank_file(rank)
            if not f.is_file():
                raise PizooError(f"{f}: missing; the checkpoint is incomplete, pass --no-resume to start over")
            self._open[rank] = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
        return self._open[rank]

    def entry(self, key: str, shape: torch.Size) -> dict:
        meta = self.manifest["tensors"].get(key)
        if meta is None:
            raise PizooError(f"{self.path / MANIFEST_FILE}: no entry for '{key}'; the checkpoint does not match this "
                             "model, pass --no-resume to start over")
        if list(meta["shape"]) != list(shape):
            raise PizooError(f"{self.path / MANIFEST_FILE}: '{key}' has shape {meta['shape']}, this model's is "
                             f"{list(shape)}; pass --no-resume to start over")
        return meta

    def whole(self, key: str, shape: torch.Size, rank: int) -> torch.Tensor:
        """A replicated tensor: this rank's own copy when it saved one, else rank 0's."""
        self.entry(key, shape)
        return self.file(rank if rank < self.manifest["world_size"] else 0).get_tensor(key)

    def copy_rows(self, key: str, shape: torch.Size, dst: torch.Tensor, offset: int) -> None:
        """Fill `dst` (this rank's rows offset..offset+len(dst) of tensor `key`) from the saved shards.

        With the world size it was saved with, each rank reads exactly its own file; with another
        it reads the overlapping row ranges of the saved shards (resharding by plain copies).
        """
        meta = self.entry(key, shape)
        if meta["placement"] != "Shard(0)":  # saved whole by every rank: take this rank's rows of rank 0's copy
            whole = self.file(0).get_tensor(key)
            dst.copy_(whole.narrow(0, offset, dst.shape[0]) if dst.ndim else whole)
            return
        end, copied = offset + dst.shape[0], 0
        for shard in meta["shards"]:
            lo, hi = max(offset, shard["offset"]), min(end, shard["offset"] + shard["rows"])
            if lo < hi:
                rows = self.file(shard["rank"]).get_slice(key)[lo - shard["offset"]:hi - shard["offset"]]
                dst[lo - offset:hi - offset].copy_(rows)
                copied += hi - lo
        if copied != dst.shape[0]:
            raise PizooError(f"{self.path / MANIFEST_FILE}: rows {offset}..{end} of '{key}' are not all saved; the "
                             "checkpoint is damaged, pass --no-resume to start over")


def _load_sharded_checkpoint(path: Path, wrapper: nn.Module, opt, dist_: _Dist, dev: torch.device) -> dict:
    """Restore parameters, AdamW state, param groups and RNG from a sharded checkpoint (any world size)."""
    manifest = _read_manifest(path)
    trainer = read_json(path / "trainer.json", "trainer state")
    params = _trainable(wrapper)
    layout = _shard_layout(params, dist_, dev)
    states: dict[str, list[str]] = {}
    for key in manifest["tensors"]:
        owner, sep, k = key.partition("::")
        if sep:
            states.setdefault(owner, []).append(k)
    if len(manifest["param_groups"]) != len(opt.param_groups):
        raise PizooError(f"{path / MANIFEST_FILE}: {len(manifest['param_groups'])} optimizer param groups saved, this "
                         f"run has {len(opt.param_groups)}; pass --no-resume to start over")
    with torch.no_grad(), _ShardReader(path, manifest) as reader:
        for name, p in params.items():
            offset = layout[name]["shards"][dist_.rank]["offset"]
            reader.copy_rows(name, p.shape, _local_rows(p), offset)
            state: dict[str, Any] = dict(manifest.get("optimizer_scalars", {}).get(name, {}))
            for k in states.get(name, []):
                key = f"{name}::{k}"
                if manifest["tensors"][key]["placement"] == "Shard(0)":
                    value = torch.zeros_like(p)  # same sharding as the parameter, as AdamW creates it
                    reader.copy_rows(key, p.shape, _local_rows(value), offset)
                else:
                    value = reader.whole(key, torch.Size(manifest["tensors"][key]["shape"]), dist_.rank)
                state[k] = value
            if state:
                opt.state[p] = state
        for group, saved in zip(opt.param_groups, manifest["param_groups"]):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        if dist_.rank < manifest["world_size"]:
            # Training draws no randomness from these generators (positions use seeded ones); they
            # are restored so any code that does (dropout, say) continues exactly too.
            f = reader.file(dist_.rank)
            torch.set_rng_state(f.get_tensor("rng::cpu"))
            if dev.type == "cuda" and "rng::cuda" in f.keys():
                torch.cuda.set_rng_state(f.get_tensor("rng::cuda"), dev)
    return trainer


# ------------------------------------------------------------------------------------------------
# Lineage


def base_weights_digest(ckpt) -> dict[str, Any]:
    """sha256 of the base weights: whole files when small, else the index and safetensors headers."""
    files = ckpt.files
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    if total <= FULL_HASH_LIMIT:
        for f in files:
            h.update(f.name.encode() + b"\0" + bytes.fromhex(sha256_file(f)))
        return {"sha256": h.hexdigest(), "sha256_of": "safetensors files"}
    index = ckpt.path / "model.safetensors.index.json"
    if index.is_file():
        h.update(index.read_bytes())
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + b"\0" + fh.read(n))
    return {"sha256": h.hexdigest(), "sha256_of": "index and safetensors headers"}


# ------------------------------------------------------------------------------------------------
# Ctrl-C


class _StopRequest:
    """First Ctrl-C (or SIGTERM) asks the loop to save and stop at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        with contextlib.suppress(ValueError):  # not the main thread: no handlers, Ctrl-C raises as usual
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _on_error(cleanup) -> Iterator[None]:
    """Run `cleanup` when the body raises (Ctrl-C included), then let the exception go on."""
    try:
        yield
    except BaseException:
        cleanup()
        raise


# ------------------------------------------------------------------------------------------------
# The engine


def _run_args(**kw) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()}


def calibrate(model, out, *, ctx: int, recipe: Any = "pi", data: list[str] | str | None = None,
              steps: int | None = None, train_len: int | None = None, seed: int = 0, resume: bool = True,
              checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, device: str | None = None,
              activation_checkpointing: bool = False, progress: bool = True, global_batch: int | None = None,
              micro_batch: int = 1, lr: float | None = None, loss_chunk: int = DEFAULT_LOSS_CHUNK,
              max_grad_norm: float = 1.0, overwrite: bool = False, keep_state: bool = False,
              min_doc_tokens: int = 0, upsample_long: int = 1, base_identity: dict | None = None, lora=None,
              offload: bool = False, log=print) -> CalibrationResult:
    """Calibrate `model` (anything resolve_model accepts) to context `ctx` with a recipe; write `out`.

    `steps`, `global_batch` (sequences per optimizer step) and `lr` override the recipe's values;
    `micro_batch` sequences go through one forward/backward (gradient accumulation covers the
    rest). `train_len` (default: ctx) shorter than ctx spreads position ids over the target range.
    `data` is anything pizoo.data.as_spec takes; `min_doc_tokens` drops shorter documents and
    `upsample_long` repeats documents longer than train_len (pizoo.data.PackedSequences).
    `lora` (pizoo.lora.LoraSettings) trains adapters (+ embeddings and norms by default) instead of
    every weight; the output is merged and the adapter is written beside it in PEFT's format.
    `offload` keeps the model state (parameters, gradients, AdamW) in host memory through FSDP2's
    CPUOffloadPolicy, for full fine-tunes too big for the GPUs (same numbers, slower steps).
    """
    from .checkpoint import open_checkpoint
    from .data import PackedSequences, as_spec, data_fingerprint, default_corpus_note
    from .recipes import load_recipe
    from .resolve import resolve_model

    t0 = time.time()
    rec = load_recipe(recipe)
    out = Path(out)
    resolved = resolve_model(model)
    if base_identity:  # what the caller resolved from the user's spec (pizoo extend's resolve stage)
        from .lineage import Identity

        resolved.identity = Identity.from_dict(base_identity) or resolved.identity
    ckpt = open_checkpoint(resolved.path)
    cfg = ckpt.config
    if cfg.rope.is_scaled:
        raise PizooError(f"{resolved.path}: model already uses '{cfg.rope.method}' scaling; calibrate an unscaled base")
    L = cfg.original_context
    if not isinstance(ctx, int) or ctx <= L:
        raise PizooError(f"--ctx {ctx}: must be greater than the model's original context ({L} tokens)")
    factor = ctx / L
    rope = rec.rope_config(cfg.rope, factor, L)
    n_steps = (rec.steps if rec.train else 0) if steps is None else int(steps)
    if n_steps < 0:
        raise PizooError(f"--steps {steps}: must be >= 0")
    T = int(ctx if train_len is None else train_len)
    if T < 2 or T > ctx:
        raise PizooError(f"--train-len {train_len}: must be between 2 and --ctx ({ctx})")
    if checkpoint_every < 1:
        raise PizooError(f"--checkpoint-every {checkpoint_every}: must be >= 1")
    if global_batch is not None and global_batch < 1:
        raise PizooError(f"--global-batch {global_batch}: must be >= 1")
    if micro_batch < 1:
        raise PizooError(f"--micro-batch {micro_batch}: must be >= 1")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise PizooError(f"--lr {lr}: must be a positive number (e.g. 2e-5)")
    if isinstance(lora, dict):  # as torchrun workers receive it (JSON)
        from .lora import LoraSettings

        lora = LoraSettings.from_dict(lora)
    from .lora import for_run

    lora = for_run(lora, rec, cfg)  # the family's projections; rank and targets checked
    check_output(out, overwrite=overwrite, inputs=[resolved.path])

    held = contextlib.ExitStack()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 writes; the lock is its
        held.enter_context(output_lock(out))
    try:
        dist_, dev = _init_distributed(device, offload)
    except BaseException:
        held.close()
        raise
    try:
        gb = int(rec.global_batch if global_batch is None else global_batch)
        if gb % (micro_batch * dist_.world):
            raise PizooError(f"--global-batch {gb}: must be a multiple of --micro-batch ({micro_batch}) x "
                             f"world size ({dist_.world})")
        accum = gb // (micro_batch * dist_.world)
        peak_lr = float(lr) if lr is not None else rec.lr_for(cfg.num_params())
        warmup = rec.warmup_for(n_steps)
        state_dir = state_dir_for(out)
        if dist_.is_main and as_spec(data).sources is None and n_steps > 0:
            log(f"note: {default_corpus_note()}")
        fingerprint = data_fingerprint(data, "train") if n_steps > 0 else None
        run_args = _run_args(base=str(resolved.path.resolve()), recipe=_recipe_settings(rec), ctx=ctx, steps=n_steps, train_len=T,
                             seed=seed, global_batch=gb, lr=peak_lr, data_fingerprint=fingerprint,
                             max_grad_norm=max_grad_norm, lora=lora.to_dict() if lora is not None else None,
                             # recorded only when set, so states saved before these options still resume
                             **({"min_doc_tokens": min_doc_tokens} if min_doc_tokens else {}),
                             **({"upsample_long": upsample_long} if upsample_long != 1 else {}))

        wrapper = _build_training_model(cfg, rope, ctx, dev, dist_, seed, activation_checkpointing, loss_chunk, lora)
        _load_base_weights(wrapper, ckpt)
        trainable = _trainable(wrapper)
        if lora is not None and dist_.is_main:
            n_train = sum(p.numel() for p in trainable.values())
            log(f"{lora.describe()}: {n_train:,} trainable parameters of {cfg.num_params():,} "
                f"({100 * n_train / max(1, cfg.num_params()):.2f}%)")
        decay, no_decay = [], []
        for name, p in trainable.items():
            (no_decay if p.ndim < 2 else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": rec.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=peak_lr, betas=rec.betas, eps=1e-8)

        start_step, losses, tokens_done = 0, [], 0
        if dist_.is_main and state_dir.exists() and (not resume or _holds_no_checkpoint(state_dir)):
            shutil.rmtree(state_dir)  # ours (the output lock is held) and nothing in it to resume from
        if dist_.is_main and state_dir.exists():
            _remove_unfinished_saves(state_dir)
        dist_.barrier()
        latest = _latest_checkpoint(state_dir) if resume and state_dir.exists() else None
        if latest is not None:
            saved = read_json(latest / "trainer.json", "trainer state")
            changed = [k for k in run_args if saved.get("run_args", {}).get(k) != run_args[k] and k != "steps"]
            if "lora" in changed:
                was = saved.get("run_args", {}).get("lora")
                raise PizooError(f"{state_dir}: saved with different LoRA settings ("
                                 f"{'none' if was is None else _lora_flags(was)}, now "
                                 f"{'none' if lora is None else _lora_flags(lora.to_dict())}); rerun with the saved "
                                 "--lora options, or pass --no-resume to start over")
            if changed:
                raise PizooError(f"{state_dir}: saved with different settings ({changed[0]}); rerun with the same "
                                 "arguments, or pass --no-resume to start over")
            if int(saved.get("step", 0)) > n_steps:
                raise PizooError(f"{latest}: saved at step {saved.get('step')}, past --steps {n_steps}; rerun with "
                                 f"--steps {saved.get('step')} or more, or pass --no-resume to start over")
            trainer = _load_checkpoint(latest, wrapper, opt, dist_, dev)
            start_step, losses, tokens_done = trainer["step"], trainer["losses"], trainer["tokens"]
            if dist_.is_main:
                saved_world = int(trainer.get("world_size", 1))
                resharded = (f", saved by {saved_world} processes, resharded to {dist_.world}"
                             if saved_world != dist_.world else "")
                log(f"resuming from {latest} (step {start_step}{resharded})")

        metrics_path = state_dir / "metrics.jsonl"
        last_saved = start_step if latest is not None else None

        def discard_unsaved() -> None:
            if dist_.is_main and last_saved is None:
                shutil.rmtree(state_dir, ignore_errors=True)  # metrics of unsaved steps only: nothing to resume

        with _on_error(discard_unsaved), writing(state_dir):  # a failed start leaves no state folder
            if dist_.is_main and n_steps > 0:
                state_dir.mkdir(parents=True, exist_ok=True)
                _truncate_metrics(metrics_path, start_step)
            stream = None
            if n_steps > start_step:
                stream = PackedSequences(resolved.path, data, T + 1, seed=seed, split="train", bos=cfg.bos_token_id,
                                         eos=cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else None,
                                         start=start_step * gb, min_doc_tokens=min_doc_tokens,
                                         upsample_long=upsample_long)

        amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda"
               else contextlib.nullcontext())
        bar = None
        if progress and dist_.is_main and n_steps > start_step:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_steps, initial=start_step, desc=f"calibrate {rec.name} -> {ctx}", unit="step",
                       dynamic_ncols=True)

        def save(step_done: int) -> None:
            nonlocal last_saved
            trainer = {"step": step_done, "losses": losses, "tokens": tokens_done, "data_position": step_done * gb,
                       "world_size": dist_.world, "run_args": run_args, "pizoo_version": __version__}
            _save_checkpoint(state_dir, step_done, wrapper, opt, trainer, dist_, dev)
            last_saved = step_done

        def failed() -> None:
            if bar is not None:
                bar.close()  # the error goes on a line of its own, after the bar
            discard_unsaved()

        wrapper.train()
        with _StopRequest() as stop, _on_error(failed), writing(state_dir):
            for step in range(start_step, n_steps):
                t_step = time.time()
                cur_lr = lr_at(step, peak=peak_lr, warmup=warmup, total=n_steps, start=rec.warmup_start,
                               schedule=rec.schedule, min_ratio=rec.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = cur_lr
                batch = stream.take(gb)
                mine = list(range(dist_.rank, gb, dist_.world))
                span = _step_span(rec, rope, ctx, T, L, seed, step)
                loss_sum = 0.0
                for a in range(accum):
                    idx = mine[a * micro_batch:(a + 1) * micro_batch]
                    seqs = torch.tensor([batch[i] for i in idx], dtype=torch.long)
                    pos = torch.stack([_positions(rec, T, span, seed, step, i) for i in idx])
                    if hasattr(wrapper, "set_requires_gradient_sync"):
                        wrapper.set_requires_gradient_sync(a == accum - 1)
                    with amp:
                        loss = wrapper(seqs[:, :-1].to(dev), pos.to(dev), seqs[:, 1:].to(dev))
                    (loss / accum).backward()
                    loss_sum += float(loss.detach())
                step_loss = dist_.all_mean(loss_sum / accum, dev)
                if not math.isfinite(step_loss):
                    kept = (f"the last good checkpoint (step {last_saved}) is kept in {state_dir}"
                            if last_saved is not None else "no checkpoint was written yet")
                    raise PizooError(f"step {step + 1}: loss is {step_loss}; training diverged and stopped ({kept}). "
                                     "Lower the learning rate (--lr) or check the data")
                norm = torch.nn.utils.clip_grad_norm_(wrapper.parameters(), max_grad_norm)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(step_loss)
                tokens_done += gb * T
                dt = time.time() - t_step
                if dist_.is_main:
                    _append_metrics(metrics_path, {"step": step + 1, "loss": step_loss, "lr": cur_lr,
                                                   "grad_norm": grad_norm, "tokens": tokens_done,
                                                   "tokens_per_s": gb * T / max(dt, 1e-9),
                                                   "elapsed_s": round(time.time() - t0, 3)})
                if bar is not None:
                    bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{gb * T / max(dt, 1e-9):,.0f}")
                    bar.update(1)
                done = step + 1
                stopping = dist_.any(stop.requested, dev)
                if stopping or (done % checkpoint_every == 0 and done < n_steps):
                    save(done)
                if stopping:
                    if bar is not None:
                        bar.close()
                    raise Interrupted(f"interrupted at step {done}/{n_steps}; state saved in {state_dir}; "
                                      "rerun the same command (with --resume, the default) to continue")
        if bar is not None:
            bar.close()
        if stream is not None and dist_.is_main:
            for line in stream.stats_lines():
                log(line)
        if keep_state and n_steps > 0 and last_saved != n_steps:
            save(n_steps)  # the final training state stays inspectable (and the ODE module with it)

        # Every rank takes part in each all-gather below; only rank 0 keeps and writes the tensors.
        clex_state = (dict(_gathered_state(wrapper, lambda n: n.startswith("lm.rotary.learned.")))
                      if rope.method == "clex" else {})
        weights = ((k.removeprefix("lm."), v) for k, v in _gathered_state(wrapper, lambda n: not n.startswith("lm.rotary.")))
        adapter: dict[str, torch.Tensor] = {}
        if lora is not None:
            from .lora import merged_tensors

            weights = merged_tensors(weights, lora, adapter)
        weights = ((cfg.family.hf_name(k), v) for k, v in weights)  # the checkpoint's own names
        if dist_.is_main:
            _write_output(out, ckpt, cfg, rope, ctx, rec, weights, clex_state, dev, resolved=resolved, data=data,
                          as_spec=as_spec, fingerprint=fingerprint, stream=stream, steps=n_steps,
                          tokens=tokens_done, train_len=T, global_batch=gb, losses=losses, seed=seed,
                          world=dist_.world, t0=t0, metrics_path=metrics_path, overwrite=overwrite, lr=peak_lr,
                          lora=lora, adapter=adapter)
            if not keep_state:
                shutil.rmtree(state_dir, ignore_errors=True)
        elif n_steps > 0:  # rank 0 streams `weights` into the output folder (steps == 0 copies the base)
            for _ in weights:
                pass
        dist_.barrier()
        return CalibrationResult(out=out, method=rec.method, factor=factor, ctx=ctx, steps=n_steps, tokens=tokens_done,
                                 final_loss=losses[-1] if losses else None, losses=list(losses),
                                 resumed_from=start_step, duration_s=time.time() - t0)
    finally:
        if dist_.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
        held.close()


def _recipe_settings(rec) -> dict:
    """The recipe as the resume check compares it: its settings, not where its file lives (a moved
    checkout or an installed copy of the same recipe must still resume)."""
    d = rec.to_dict()
    d.pop("path", None)
    return d


def _step_span(rec, rope, ctx: int, T: int, L: int, seed: int, step: int) -> int:
    """The range of position ids this step's sequences cover.

    Static methods cover the whole target (ctx). CLEX samples an integer scale t in [1, max] per
    step (same on every rank) and covers t*L, so the ODE learns every scale up to the target.
    """
    if rec.method != "clex":
        return ctx
    t_max = min(int(math.floor(rope.max_factor)), math.ceil(ctx / L))
    t = int(torch.randint(1, t_max + 1, (1,), generator=_generator(seed, "clex-scale", step)))
    return max(T, min(ctx, t * L))


def _positions(rec, T: int, span: int, seed: int, step: int, index: int) -> torch.Tensor:
    gen = _generator(seed, "positions", step, index)
    if rec.positions == "sorted-random":
        return sorted_random_positions(T, span, gen)
    return pose_positions(T, span, gen)


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """Keep the metric lines of steps <= upto_step (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= upto_step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _write_output(out: Path, ckpt, cfg, rope, ctx: int, rec, weights: Iterator[tuple[str, torch.Tensor]],
                  clex_state: dict[str, torch.Tensor], dev, *, resolved, data, as_spec, fingerprint, stream,
                  steps, tokens, train_len, global_batch, losses, seed, world, t0, metrics_path: Path, overwrite: bool,
                  lr: float, lora=None, adapter: dict[str, torch.Tensor] | None = None) -> None:
    """The HF folder: trained weights in the base dtype, scaled config.json, tokenizer, lineage.

    `weights` (HF names) is consumed one tensor at a time while writing; `clex_state` holds the
    trained ODE module's tensors (wrapper names), baked into the config before any weight is written.
    With LoRA the weights arrive merged and `adapter` (filled while they stream) is written to
    `adapter/` in PEFT's format, inside the same atomic folder.
    """
    from .checkpoint import DTYPE_NAMES, write_checkpoint

    out_rope = rope
    if rope.method == "clex":
        from .clex import bake_clex, clex_module_for

        module = clex_module_for(rope, cfg.rope_dim)
        module.load_state_dict({k.removeprefix("lm.rotary.learned."): v for k, v in clex_state.items()})
        out_rope = bake_clex(module.eval(), rope, ctx)
    out_cfg = cfg.with_rope(out_rope, ctx)
    # Absolute: `pizoo eval` finds the baseline through this path from any working directory.
    # The public identity (pizoo.lineage) beside the sha256 that proves which bytes were used; the
    # local spec and path stay in calibration.json only (cut before any upload).
    identity = resolved.identity.to_dict()
    digest = base_weights_digest(ckpt)
    base_record = {"spec": resolved.spec, "path": str(Path(resolved.path).resolve()),
                   "hub_id": resolved.identity.hub_id or resolved.hub_id,
                   "revision": resolved.identity.revision or resolved.revision, "identity": identity, **digest}
    block = out_cfg.raw["pizoo"]
    for key in ("base_model", "gguf_general", "source_gguf", "identity"):  # the base's own facts: now in base_identity
        block.pop(key, None)
    if resolved.identity.public:
        block["base_model"] = resolved.identity.label
    block.update({"base_identity": identity, "base_sha256": digest["sha256"], "recipe": rec.name,
                  "original_context": cfg.original_context})
    calib = {
        "base_model": base_record,
        "recipe": rec.to_dict(),
        "method": rec.method,
        "factor": ctx / cfg.original_context,
        "ctx": ctx,
        "original_context": cfg.original_context,
        "steps": steps,
        "tokens": tokens,
        "train_len": train_len,
        "global_batch": global_batch,
        "lr": lr,
        "data": None if steps == 0 else {
            **as_spec(data).record(), "split": "train", "fingerprint": fingerprint,
            **(stream.stats_record() if stream is not None else {"documents": None, "tokens": None})},
        "final_loss": losses[-1] if losses else None,
        "seed": seed,
        "world_size": world,
        "device": str(dev.type),
        "duration_s": round(time.time() - t0, 3),
        "pizoo_version": __version__,
    }
    if lora is not None:
        calib["lora"] = {**lora.to_dict(), "adapter": None if steps == 0 else "adapter/"}
    if rope.method == "clex":
        calib["clex"] = {"baked_scale": min(math.ceil(ctx / cfg.original_context), int(rope.max_factor)),
                         "long_factor": out_rope.long_factor}
    base_dtype = DTYPE_NAMES.get(ckpt.dtype(), torch.float32)
    tensors: Iterator = ckpt.iter_tensors() if steps == 0 else weights
    extra = {"calibration.json": json.dumps(calib, indent=2) + "\n"}
    if metrics_path.is_file():
        extra["metrics.jsonl"] = metrics_path.read_text()
    finish = None
    if lora is not None and steps > 0:
        from .lora import ADAPTER_DIR, write_peft_adapter

        # Runs after every weight has streamed, when `adapter` is complete.
        finish = lambda tmp: write_peft_adapter(  # noqa: E731
            tmp / ADAPTER_DIR, lora, adapter, base_model=resolved.hub_id or resolved.spec,
            tied_embeddings=cfg.tie_word_embeddings)
    write_checkpoint(out, out_cfg, tensors, copy_files_from=ckpt.path, dtype=base_dtype, overwrite=overwrite,
                     extra_files=extra, finish=finish)


def default_output_dir(model: str, ctx: int, recipe: str) -> Path:
    """<model name>-<ctx, e.g. 32k>-<recipe name> in the current folder."""
    name = Path(str(model).rstrip("/")).name or "model"
    size = f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)
    return Path(f"{name}-{size}-{Path(str(recipe)).stem}")


def _lora_flags(d: dict) -> str:
    trainable = ",".join(d.get("trainable") or []) or "none"
    return (f"--lora {d['rank']} --lora-alpha {d['alpha']:g} --lora-targets {','.join(d['targets'])} "
            f"--lora-trainable {trainable}")
