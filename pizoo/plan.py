"""The plan of a `pizoo extend` run: what it will do, what it needs, how long it will take.

The plan is printed before any work starts and is the whole output of `--dry-run`, which touches
nothing (no download, no import, no output folder). It is built from the model's shapes only: a
local config.json when the model is on disk, otherwise the known bases: the shipped zoo aliases
that carry a shape table (pizoo/resources/aliases.toml, read by `known_bases`).

Memory model (bytes per device, for the chosen settings):
- Model state, sharded by FSDP over WORLD_SIZE devices: weights + gradients + AdamW's two moments.
  CPU trains in float32 (4 + 4 + 8 bytes per parameter); GPUs train in bf16 with float32 master
  weights, float32 gradients and moments (16 bytes per parameter, sharded) plus the bf16 copy of
  the layers FSDP has gathered (two layers: the current one and the prefetched next one).
- Activations per token and layer, counted tensor by tensor in pizoo.model (SDPA's flash/efficient
  kernels keep no T x T matrix): 10*h + 4*kv + 4*I elements. With activation checkpointing only each
  layer's input (h) is kept, plus one layer's full set while it is recomputed.
- The loss head runs in chunks (pizoo.model.chunked_log_probs): chunk x vocab float32 logits, their
  softmax and gradient; the unchunked figure is shown for comparison.
- LoRA (--lora, pizoo.lora): the frozen base weights are stored once (bf16 on GPUs, float32 on CPU)
  with no gradients or optimizer state; the trainable parameters (the adapters, plus embeddings and
  norms for LongLoRA+) cost 16 bytes each as above. Activations drop what only frozen projections
  would keep (their inputs, for weight gradients never computed) and add each adapter's rank-r
  intermediate.
- --offload (FSDP2's CPUOffloadPolicy): parameters, gradients and AdamW state live in host memory
  (sharded over the processes); a device holds the gathered layers, the activations and the loss
  head. The plan states the host memory the state needs per process.

Time model: training FLOPs per token = 6 * (non-embedding params + head params)
(with LoRA: 4 per frozen parameter, whose weight gradient is never computed, 6 per trainable one)
+ 12 * layers * heads * head_dim * train_len (the attention term, not halved for causality: an
upper bound), times 4/3 with activation checkpointing (one extra forward). Throughput per device:
GPUs from their name (dense bf16 peak) at an assumed MFU; the CPU is measured with a short float32
matmul at an assumed fraction of it (calibrated against pizoo's own CPU runs).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import ATTENTION_BLOCK, ModelConfig, RopeConfig
from .errors import PizooError
from .families import FAMILIES, family, family_for_gguf
from .fsutil import human_bytes

GiB = 1024**3


# Dense bf16 (fp16 where the card has no bf16) tensor-core peak per device, TFLOP/s, and memory GiB.
# Matched against torch.cuda.get_device_name() by the first pattern that occurs in it.
GPU_TABLE: list[tuple[str, str, float, float]] = [
    # (pattern, display name, peak TFLOP/s, memory GiB)
    ("h200", "H200", 989.0, 141.0),
    ("h100 pcie", "H100 PCIe", 756.0, 80.0),
    ("h100", "H100 SXM", 989.0, 80.0),
    ("gh200", "GH200", 989.0, 96.0),
    ("b200", "B200", 2250.0, 180.0),
    ("a100", "A100", 312.0, 80.0),
    ("l40s", "L40S", 362.0, 48.0),
    ("a10g", "A10G", 70.0, 24.0),
    ("a10", "A10", 125.0, 24.0),
    ("l4", "L4", 121.0, 24.0),
    ("4090", "RTX 4090", 165.0, 24.0),
    ("3090", "RTX 3090", 71.0, 24.0),
    ("v100", "V100", 125.0, 32.0),
    ("t4", "T4", 65.0, 16.0),
    ("mi300x", "MI300X", 1307.0, 192.0),
]
# Model FLOPs utilisation assumed on GPUs: torchtitan's Llama-3.1-8B FSDP bf16 run on H100 (about
# 5.8k tokens/s/GPU at 8k) works out to about 32% with the attention term; pizoo assumes 30%.
# pizoo's own calibration step measured 34% / 44% / 42% at 8k / 16k / 32k for a 1.1B Llama on one
# H100 (bench/RESULTS.md, B3): 30% stays, as the conservative figure for sharded larger models.
GPU_MFU = 0.30
# On CPU: the fraction of the measured float32 matmul rate a training step reaches. pizoo's
# SmolLM2-135M calibration (512-token sequences) on the 2-core development machine ran at about
# 6 GFLOP/s by this FLOPs count while the matmul measured 19 GFLOP/s: 0.3.
CPU_MFU = 0.30
# Used when no measurement is wanted (tests, --hardware cpu): a conservative 2-core rate.
CPU_FALLBACK_GFLOPS = 50.0
# Fraction of device memory a plan may use (allocator fragmentation, other processes).
MEMORY_HEADROOM = 0.90
# Fixed overhead per process: CUDA context and allocator slack on GPUs; interpreter + torch on CPU.
GPU_OVERHEAD_BYTES = 2 * GiB
CPU_OVERHEAD_BYTES = 1 * GiB
# Loss head chunk (positions per chunk), as in pizoo.model.chunked_log_probs.
LOSS_CHUNK = 1024
# Export throughput (bytes written per second) for conversion time estimates: llama.cpp's own
# converter writes about 170 MB/s on a 2-core machine (see docs/REFERENCE); pizoo streams alike.
EXPORT_BYTES_PER_S = 150e6
FORMATS = ("hf", "gguf", "trtllm")


# ------------------------------------------------------------------------------------------------
# Model shapes


def known_bases() -> dict[str, dict[str, Any]]:
    """Shapes of common RoPE bases, so a plan needs no download: the shipped zoo aliases that carry a
    [NAME.shape] table (pizoo/resources/aliases.toml), flattened to {hub_id, also, architecture,
    context, vocab_size, ...}. One table serves both the zoo's aliases and the planner."""
    from .zoo import shipped_aliases

    out = {}
    for alias, entry in shipped_aliases().items():
        if "shape" in entry:
            out[alias] = {"hub_id": entry["hub_id"], "also": tuple(entry.get("also", ())),
                          "architecture": entry["architecture"], "context": entry["context"], **entry["shape"]}
    return out


def known_base(spec: str) -> tuple[str, dict[str, Any]] | None:
    """The known-bases entry for an alias or a Hub id (case-insensitive), or None."""
    key = spec.strip().lower()
    bases = known_bases()
    if key in bases:
        return key, bases[key]
    for alias, entry in bases.items():
        if key in (h.lower() for h in (entry["hub_id"], *entry.get("also", ()))):
            return alias, entry
    return None


def config_from_known(entry: dict[str, Any]) -> ModelConfig:
    heads = entry["num_heads"]
    fam = family(entry["architecture"])
    return ModelConfig(
        architecture=fam.model_type, vocab_size=entry["vocab_size"], hidden_size=entry["hidden_size"],
        intermediate_size=entry["intermediate_size"], num_layers=entry["num_layers"], num_heads=heads,
        num_kv_heads=entry["num_kv_heads"], head_dim=entry.get("head_dim", entry["hidden_size"] // heads),
        max_position_embeddings=entry["context"], rope=RopeConfig(theta=entry.get("theta", 10000.0)),
        tie_word_embeddings=entry.get("tie_word_embeddings", False),
        **fam.known_features(entry, entry["num_layers"]), torch_dtype="bfloat16")


def planning_config(spec: str) -> tuple[ModelConfig, str]:
    """The shapes to plan with, without downloading or importing anything: (config, where from).

    A local HF folder's config.json; a GGUF file's header (also the file an alias resolves to here:
    a packaged GGUF or a user alias's --gguf); otherwise the known-bases table by alias or Hub id
    (also for zoo aliases that are not downloaded yet).
    """
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelConfig.from_file(path / "config.json"), f"{path / 'config.json'}"
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_planning_config(path), f"{path} (GGUF header)"
    try:
        from .resolve import resolve_local

        local = resolve_local(spec)
    except (ImportError, AttributeError, PizooError):
        local = None
    if local is not None and (Path(local.path) / "config.json").is_file():
        return ModelConfig.from_file(Path(local.path) / "config.json"), f"zoo: {local.path}"
    from .resolve import alias_gguf

    on_disk = alias_gguf(spec)  # the GGUF this alias resolves to here (packaged, or a user alias's file)
    if on_disk is not None:
        return gguf_planning_config(on_disk[0]), f"{on_disk[0].name} (GGUF header of the alias '{spec}')"
    hit = known_base(spec)
    if hit is None:
        alias_hub = _zoo_alias_hub_id(spec)
        hit = known_base(alias_hub) if alias_hub else None
    if hit is not None:
        alias, entry = hit
        return config_from_known(entry), f"known shapes of {alias} ({entry['hub_id']})"
    raise PizooError(f"cannot plan for '{spec}': its shapes are unknown without downloading it; give a local HF "
                     f"folder or .gguf file, a Hub id that is downloaded first (pizoo pull), or one of "
                     f"{', '.join(sorted(known_bases()))}")


def _zoo_alias_hub_id(spec: str) -> str | None:
    try:
        from . import zoo as zoo_mod

        return zoo_mod.alias_hub_id(spec)
    except (ImportError, AttributeError, PizooError):
        return None


def gguf_planning_config(path: Path) -> ModelConfig:
    """Shapes from a GGUF file's metadata (memory-mapped header read; no tensor is loaded)."""
    from gguf import GGUFReader

    from .export.gguf import KEY_ARCH

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the gguf package raises bare ValueErrors/struct errors on bad files
        raise PizooError(f"{path}: not a readable GGUF file ({e})") from None

    def field_value(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    arch = field_value("general.architecture", "llama")
    p = f"{arch}."
    hidden = int(field_value(p + "embedding_length"))
    heads = int(field_value(p + "attention.head_count"))
    tokens = field_value("tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    fam = FAMILIES.get(field_value(KEY_ARCH)) or family_for_gguf(arch, names) or family("llama")
    features = fam.gguf_features(field_value, names)
    return ModelConfig(
        architecture=fam.model_type, vocab_size=len(tokens) or 32000, **features,
        hidden_size=hidden, intermediate_size=int(field_value(p + "feed_forward_length")),
        num_layers=int(field_value(p + "block_count")), num_heads=heads,
        num_kv_heads=int(field_value(p + "attention.head_count_kv", heads)),
        head_dim=int(field_value(p + "attention.key_length", hidden // heads)),
        max_position_embeddings=int(field_value(p + "context_length")),
        rope=RopeConfig(theta=float(field_value(p + "rope.freq_base", 10000.0))),
        tie_word_embeddings="output.weight" not in names, torch_dtype="float32")


# ------------------------------------------------------------------------------------------------
# Hardware


@dataclass
class Hardware:
    kind: str  # "cpu" | "cuda"
    name: str
    count: int  # devices the run is spread over (WORLD_SIZE under torchrun)
    memory_bytes: float  # per device
    peak_flops: float  # per device, training precision
    mfu: float
    source: str  # how the figures were obtained

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.mfu

    def describe(self) -> str:
        n = f"{self.count} x " if self.count > 1 else ""
        return (f"{n}{self.name}, {human_bytes(self.memory_bytes)} per device, "
                f"{self.peak_flops / 1e12:.3g} TFLOP/s peak at {self.mfu:.0%} MFU ({self.source})")


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise PizooError(f"WORLD_SIZE: must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def cpu_available_memory() -> float:
    """Memory this process can use: MemAvailable, capped by a cgroup limit when there is one."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 8 * GiB
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return float(avail)


def measure_cpu_flops(trials: int = 5, seconds: float = 0.06) -> float:
    """float32 matmul FLOP/s on this CPU with torch's thread count: the best of a few short trials
    (a machine shared with other work is measured at its best moments, as a training run's long
    matmuls also get them), on 1024 x 1024 matrices like a small model's layers."""
    import torch

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up the kernels and thread pool
    best = 0.0
    for _ in range(trials):
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


def detect_hardware(*, measure: bool = True) -> Hardware:
    """This machine's devices: CUDA GPUs by name, otherwise the CPU (measured unless measure=False)."""
    count = world_size()
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:  # planning works without torch too
        cuda = False
    if cuda:
        name = torch.cuda.get_device_name(0)
        mem = float(torch.cuda.get_device_properties(0).total_memory)
        for pattern, display, tflops, _ in GPU_TABLE:
            if pattern in name.lower():
                return Hardware("cuda", display, count, mem, tflops * 1e12, GPU_MFU, f"peak of {display} from its name")
        return Hardware("cuda", name, count, mem, 100e12, GPU_MFU, "unknown GPU: assumed 100 TFLOP/s peak")
    threads = os.cpu_count() or 1
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        pass
    if measure:
        flops, source = measure_cpu_flops(), "CPU matmul measured now"
    else:
        flops, source = CPU_FALLBACK_GFLOPS * 1e9, "CPU, conservative constant"
    return Hardware("cpu", f"CPU ({threads} threads)", count, cpu_available_memory(), flops, CPU_MFU, source)


def named_hardware(spec: str) -> Hardware:
    """Hardware from a name for planning elsewhere: 'cpu', 'h100', 'h100x8', 'a100x16', ..."""
    m = re.fullmatch(r"\s*([a-z0-9 ]+?)\s*(?:x\s*(\d+))?\s*", spec.lower())
    if not m:
        raise PizooError(f"--hardware {spec}: use a GPU name with an optional count (h100, h100x8, a100x16) or cpu")
    name, count = m.group(1), int(m.group(2) or 1)
    if name == "cpu":
        return Hardware("cpu", "CPU", count, cpu_available_memory(), CPU_FALLBACK_GFLOPS * 1e9, CPU_MFU,
                        "CPU, conservative constant")
    for pattern, display, tflops, mem_gib in GPU_TABLE:
        if pattern.replace(" ", "") in name.replace(" ", ""):
            return Hardware("cuda", display, count, mem_gib * GiB, tflops * 1e12, GPU_MFU,
                            f"peak of {display} from the GPU table")
    known = ", ".join(sorted({p for p, *_ in GPU_TABLE}))
    raise PizooError(f"--hardware {spec}: unknown device '{name}'; use cpu or one of {known}")


# ------------------------------------------------------------------------------------------------
# Estimates


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    gathered_layers: float  # FSDP's unsharded working copy (GPU, more than one device)
    activations: float  # without activation checkpointing
    activations_checkpointed: float
    logits_chunked: float
    logits_full: float
    overhead: float
    activation_checkpointing: bool  # chosen setting
    peak: float  # for the chosen setting, chunked loss
    capacity: float  # usable bytes per device
    trainable_params: int = 0  # all of them in a full fine-tune
    host_state: float = 0.0  # --offload: weights + gradients + AdamW state in host memory, per process

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer, from the family's tensor table (layer 0)."""
    return sum(math.prod(t.shape) for t in cfg.family.layer_tensors(cfg, 0))


def activation_elements_per_token_layer(cfg: ModelConfig, lora=None) -> int:
    """Saved activations of one decoder layer per token (elements), as pizoo.model computes it:
    two norms' inputs and outputs (4h), q/k/v projections and rotated q/k (2h + 4kv... counted as
    h + 2kv + h + kv, rounded up to 4kv), attention output and o_proj input (2h), the residual
    inputs (2h), and the MLP's gate, up, silu(gate) and product (4I; a plain MLP, GPT-NeoX: up and
    act(up), 2I). Gemma's two extra norms add 4h. With LoRA, less (see below)."""
    h, kv, i = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    full = 10 * h + 4 * kv + (4 if cfg.gated_mlp else 2) * i + (4 * h if cfg.sandwich_norms else 0)
    if lora is None:
        return full
    from .lora import resolved_targets

    # A frozen projection keeps nothing for its weight gradient, so an input that only frozen
    # projections read is not saved (the MLP's, with attention-only adapters); each adapter keeps
    # its rank-r intermediate for B's gradient.
    targets = set(resolved_targets(lora, cfg))
    inputs = {("q", "k", "v", "qkv"): h, ("o",): h, ("gate", "up", "gate_up"): h, ("down",): i}
    dropped = sum(n for readers, n in inputs.items() if not targets & set(readers))
    return full - dropped + lora.rank * len(targets)


def kept_scores_per_head(cfg: ModelConfig, layer: int, seq_len: int) -> int:
    """Attention probabilities one layer keeps for backward, per head (pizoo.model.attend): none on
    the flash path (a whole causal sequence); past a sliding window, SDPA's math kernel on each
    512-query block keeps [block, window + block]; soft-capped scores (eager) keep every visible key."""
    window = cfg.layer_window(layer)
    windowed = window is not None and seq_len > window
    if cfg.attn_logit_softcap is None and not windowed:
        return 0
    return seq_len * (min(seq_len, window + ATTENTION_BLOCK) if windowed else seq_len)


def attended_keys(cfg: ModelConfig, seq_len: int) -> int:
    """Keys per query summed over the layers (a sliding-window layer attends to at most its window)."""
    return sum(min(seq_len, cfg.layer_window(i) or seq_len) for i in range(cfg.num_layers))


def trainable_params(cfg: ModelConfig, lora=None) -> tuple[int, int]:
    """(trainable, frozen) parameter counts: everything trains in a full fine-tune; with LoRA the
    adapters and the --lora-trainable extras train and the rest of the base is frozen."""
    n = cfg.num_params()
    if lora is None:
        return n, 0
    from .lora import adapter_params, extra_trainable_params

    extra = extra_trainable_params(lora, cfg)
    return adapter_params(lora, cfg) + extra, n - extra


def estimate_memory(cfg: ModelConfig, hw: Hardware, *, train_len: int, micro_batch: int = 1,
                    activation_checkpointing: bool | None = None, lora=None, offload: bool = False) -> MemoryEstimate:
    """Peak bytes per device of one calibration step (see the module docstring for the model).

    activation_checkpointing=None chooses: off when the plan fits without it, else on.
    """
    shards = hw.count
    gpu = hw.kind == "cuda"
    act_bytes = 2 if gpu else 4
    n_train, n_frozen = trainable_params(cfg, lora)
    weights = (4 * n_train + (2 if gpu else 4) * n_frozen) / shards
    gradients = 4 * n_train / shards
    optimizer = 8 * n_train / shards
    gathered = 2 * 2 * layer_params(cfg) if gpu and (shards > 1 or offload) else 0.0
    tokens = train_len * micro_batch
    per_layer_tok = activation_elements_per_token_layer(cfg, lora) * act_bytes
    kept = [micro_batch * cfg.num_heads * kept_scores_per_head(cfg, i, train_len) * act_bytes
            for i in range(cfg.num_layers)]
    activations = cfg.num_layers * tokens * per_layer_tok + sum(kept) + tokens * cfg.hidden_size * act_bytes * 2
    checkpointed = (cfg.num_layers * tokens * cfg.hidden_size * act_bytes + tokens * per_layer_tok + max(kept)
                    + tokens * cfg.hidden_size * act_bytes * 2)
    # float32 logits, their log-softmax and its gradient, for one chunk (or all positions).
    logits_chunked = 3 * min(tokens, LOSS_CHUNK) * cfg.vocab_size * 4
    logits_full = 3 * tokens * cfg.vocab_size * 4
    overhead = GPU_OVERHEAD_BYTES if gpu else CPU_OVERHEAD_BYTES
    capacity = hw.memory_bytes * MEMORY_HEADROOM
    host_state = weights + gradients + optimizer if offload else 0.0
    state = (0.0 if offload else weights + gradients + optimizer) + gathered + logits_chunked + overhead
    if activation_checkpointing is None:
        activation_checkpointing = state + activations > capacity
    peak = state + (checkpointed if activation_checkpointing else activations)
    return MemoryEstimate(weights, gradients, optimizer, gathered, activations, checkpointed, logits_chunked,
                          logits_full, overhead, activation_checkpointing, peak, capacity, n_train, host_state)


def train_flops_per_token(cfg: ModelConfig, train_len: int, *, activation_checkpointing: bool, lora=None) -> float:
    """6 * (non-embedding + head) params + 12 * L * H * Q * T; x4/3 with activation checkpointing.

    With LoRA the frozen matrices cost 4 FLOPs per parameter (forward and input gradient, no weight
    gradient) and the adapters 6; the head is frozen unless --lora-trainable names it (or embed with
    tied embeddings)."""
    head = cfg.vocab_size * cfg.hidden_size
    dense = 6 * (cfg.num_non_embedding_params() + head)
    if lora is not None:
        from .lora import adapter_params

        head_trains = "head" in lora.trainable or ("embed" in lora.trainable and cfg.tie_word_embeddings)
        dense = 4 * (cfg.num_non_embedding_params() + head) + 6 * adapter_params(lora, cfg) + (2 * head if head_trains
                                                                                                else 0)
    attention = 12 * cfg.num_heads * cfg.head_dim * attended_keys(cfg, train_len)
    return (dense + attention) * (4 / 3 if activation_checkpointing else 1.0)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    head = cfg.vocab_size * cfg.hidden_size
    return 2 * (cfg.num_non_embedding_params() + head) + 4 * cfg.num_heads * cfg.head_dim * attended_keys(cfg, seq_len)


# ------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    model: str
    model_source: str
    architecture: str
    params: int
    non_embedding_params: int
    original_context: int
    target_context: int
    factor: float
    recipe: str
    method: str
    trains: bool
    hyperparameters: dict[str, Any]
    steps: int
    train_len: int
    global_batch: int
    micro_batch: int
    grad_accumulation: int
    tokens: int
    hardware: dict[str, Any]
    memory: dict[str, Any]
    activation_checkpointing: bool
    flops_per_token: float
    seconds: dict[str, float]
    formats: list[str]
    outputs: dict[str, str]
    push: str | None
    fits: bool
    evaluation: dict[str, Any] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)  # what to change when the plan does not fit
    notes: list[str] = field(default_factory=list)  # things worth knowing that do not stop the run
    lora: dict[str, Any] | None = None  # pizoo.lora.LoraSettings.to_dict() when calibrating with LoRA
    offload: bool = False  # --offload: model state in host memory (FSDP2's CPUOffloadPolicy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_train_len(ctx: int, train_len: int | None) -> int:
    if train_len is None:
        return ctx
    if train_len < 16:
        raise PizooError(f"--train-len {train_len}: must be at least 16 tokens")
    if train_len > ctx:
        raise PizooError(f"--train-len {train_len}: must not exceed --ctx {ctx}")
    return train_len


def make_plan(spec: str, cfg: ModelConfig, model_source: str, *, ctx: int, recipe, hw: Hardware,
              steps: int | None = None, train_len: int | None = None, formats: list[str] | tuple[str, ...] = FORMATS,
              out: Path | None = None, push: str | None = None, gguf_dtype: str = "f16", tp: int = 1,
              global_batch: int | None = None, evaluation: dict[str, Any] | None = None, lora=None,
              offload: bool = False) -> Plan:
    """Everything the run will do and need, from the model's shapes and the recipe (no side effects)."""
    original = cfg.original_context
    if cfg.rope.is_scaled:
        raise PizooError(f"{spec}: already uses '{cfg.rope.method}' RoPE scaling (factor {cfg.rope.factor:g}); "
                         "extend an unscaled base model")
    if ctx <= original:
        raise PizooError(f"--ctx {ctx}: must exceed the model's context length {original}")
    factor = ctx / original
    from .lora import for_run

    lora = for_run(lora, recipe, cfg)  # the family's projections; rank and targets checked
    t_len = choose_train_len(ctx, train_len)
    n_steps = (recipe.steps if steps is None else steps) if recipe.train else 0
    if steps is not None and steps < 1 and recipe.train:
        raise PizooError(f"--steps {steps}: must be >= 1")
    if global_batch is not None and global_batch < 1:
        raise PizooError(f"--global-batch {global_batch}: must be >= 1")
    global_batch = (global_batch or recipe.global_batch) if recipe.train else 0
    micro_batch = 1
    if recipe.train and global_batch % (micro_batch * hw.count):
        # The engine splits each global batch evenly over devices (pizoo.train.calibrate refuses
        # otherwise); refusing here keeps a plan from passing and calibration failing later.
        raise PizooError(f"--global-batch {global_batch}: must be a multiple of the number of devices "
                         f"({hw.count}) x the micro-batch ({micro_batch})")
    accumulation = max(1, global_batch // (micro_batch * hw.count)) if recipe.train else 0
    tokens = n_steps * global_batch * t_len
    params = cfg.num_params()
    hyper = {"lr": recipe.lr_for(params), "betas": list(recipe.betas), "weight_decay": recipe.weight_decay,
             "warmup_steps": recipe.warmup_for(n_steps) if n_steps else 0, "warmup_start": recipe.warmup_start,
             "schedule": recipe.schedule, "positions": recipe.positions if t_len < ctx else "contiguous",
             "rope": dict(recipe.rope)}
    mem = (estimate_memory(cfg, hw, train_len=t_len, micro_batch=micro_batch, lora=lora, offload=offload)
           if recipe.train else None)
    ac = bool(mem and mem.activation_checkpointing)
    fpt = train_flops_per_token(cfg, t_len, activation_checkpointing=ac, lora=lora)
    calibrate_s = tokens * fpt / (hw.count * hw.effective_flops) if tokens else 0.0
    from .export.quantize import ladder_bytes

    evaluation = dict(evaluation or {})
    eval_seconds = estimate_eval_seconds(cfg, ctx, hw, evaluation)
    bytes_per_format = {"hf": (4 if cfg.torch_dtype == "float32" else 2) * params,
                        "gguf": ladder_bytes(gguf_dtype, params),
                        "trtllm": 2 * params}
    convert_s = sum(bytes_per_format[f] for f in formats) / EXPORT_BYTES_PER_S
    seconds = {"calibrate": calibrate_s, "evaluate": eval_seconds, "convert": convert_s,
               "total": calibrate_s + eval_seconds + convert_s}
    out = out or default_out_dir(spec, ctx)
    outputs = {"hf": str(out / "hf"), "eval": str(out / "eval" / "eval.json"), "run": str(out / "run.json")}
    if "gguf" in formats:
        outputs["gguf"] = str(out / "gguf")
    if "trtllm" in formats:
        outputs["trtllm"] = str(out / "trtllm")
    memory = {} if mem is None else {k: v for k, v in asdict(mem).items()}
    if mem is not None:
        memory["fits"] = mem.fits
    plan = Plan(model=spec, model_source=model_source, architecture=cfg.architecture, params=params,
                non_embedding_params=cfg.num_non_embedding_params(), original_context=original, target_context=ctx,
                factor=factor, recipe=recipe.name, method=recipe.method, trains=recipe.train, hyperparameters=hyper,
                steps=n_steps, train_len=t_len, global_batch=global_batch, micro_batch=micro_batch,
                grad_accumulation=accumulation, tokens=tokens, hardware=asdict(hw) | {"description": hw.describe()},
                memory=memory, activation_checkpointing=ac, flops_per_token=fpt, seconds=seconds,
                formats=list(formats), outputs=outputs, push=push, fits=mem is None or mem.fits,
                evaluation=evaluation, lora=lora.to_dict() if lora is not None else None, offload=offload)
    if evaluation.get("gate", True) and eval_seconds > 3600 and hw.kind == "cpu":
        plan.notes.append(f"the full evaluation up to {ctx} tokens takes about {format_duration(eval_seconds)} on "
                          "this CPU; --eval quick checks short lengths in minutes (ungated), a GPU runs the full one")
    if not plan.fits:
        plan.advice = fit_advice(cfg, hw, mem, train_len=t_len, ctx=ctx, tokens=tokens, lora=lora, offload=offload)
    return plan


def eval_lengths(original: int, ctx: int, lengths: list[int] | None, gated: bool) -> list[int]:
    """The context lengths pizoo.eval measures: the given ones (plus the original and the target
    when gated), else the original, its doublings below the target, and the target."""
    if lengths:
        return sorted(set(lengths) | ({original, ctx} if gated else set()))
    out, c = [original], original * 2
    while c < ctx:
        out.append(c)
        c *= 2
    return sorted(set(out + [ctx]))


def estimate_eval_seconds(cfg: ModelConfig, ctx: int, hw: Hardware, evaluation: dict[str, Any]) -> float:
    """Forward passes of the evaluation as pizoo.eval runs it: per length c, one document of
    D = max length tokens in windows of c moving by the stride ((D - c) / stride + 1 windows); the
    baseline at the original length; passkey prompts at `distances` lengths spread over the window,
    `trials` each. One document is assumed when the number is not capped."""
    gated = evaluation.get("gate", True)
    lengths = eval_lengths(cfg.original_context, ctx, evaluation.get("ctx"), gated)
    doc = max(lengths)
    docs = evaluation.get("max_documents") or 1

    def ppl_flops(c: int, stride: int) -> float:
        windows = max(0, doc - c) // max(1, min(stride, c)) + 1
        return docs * windows * c * forward_flops_per_token(cfg, c)

    stride = evaluation.get("stride", 256)
    flops = sum(ppl_flops(c, stride) for c in lengths)
    if evaluation.get("baseline", True):
        flops += ppl_flops(cfg.original_context, stride)
    window = evaluation.get("passkey_window") or doc
    distances = evaluation.get("passkey_distances", 32)
    trials = evaluation.get("passkey_trials", 10)
    for i in range(1, distances + 1):
        n = window * i // distances
        flops += trials * n * forward_flops_per_token(cfg, n)
    return flops / hw.effective_flops  # the evaluation runs on one device (rank 0)


def fit_advice(cfg: ModelConfig, hw: Hardware, mem: MemoryEstimate, *, train_len: int, ctx: int,
               tokens: int, lora=None, offload: bool = False) -> list[str]:
    """What to change so the plan fits: LoRA, CPU offload, more GPUs through torchrun, shorter
    sequences, checkpointing."""
    advice = []
    if lora is None:
        advice += _lora_advice(cfg, hw, train_len=train_len, tokens=tokens)
    if not offload and hw.kind == "cuda":
        m = estimate_memory(cfg, hw, train_len=train_len, lora=lora, offload=True)
        if m.fits:
            advice.append(f"offload the parameters and AdamW state to host memory: --offload fits on the GPU "
                          f"({human_bytes(m.peak)} per device; {human_bytes(m.host_state)} of host memory per "
                          "process; slower: every step moves the state over PCIe)")
    gpu = named_hardware("h100") if hw.kind == "cpu" else hw
    for count in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128):
        if count < hw.count and hw.kind == "cuda":
            continue
        trial = Hardware(gpu.kind, gpu.name, count, gpu.memory_bytes, gpu.peak_flops, gpu.mfu, gpu.source)
        m = estimate_memory(cfg, trial, train_len=train_len, lora=lora)
        if m.fits:
            fpt = train_flops_per_token(cfg, train_len, activation_checkpointing=m.activation_checkpointing, lora=lora)
            hours = tokens * fpt / (count * trial.effective_flops) / 3600
            nodes = math.ceil(count / 8)
            launch = (f"torchrun --standalone --nproc_per_node {count} -m pizoo.cli extend ..." if count <= 8 else
                      f"torchrun --nnodes {nodes} --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HEAD:29500 "
                      "-m pizoo.cli extend ... (on every node)")
            advice.append(f"use {count} x {gpu.name} ({human_bytes(m.peak)} per GPU with FSDP, about "
                          f"{hours:.1f} h): {launch}")
            break
    else:
        advice.append(f"even 128 x {gpu.name} cannot hold it at --train-len {train_len}; shorten the sequences")
    for t in (16384, 8192, 4096, 2048, 1024, 512):
        if t >= train_len:
            continue
        m = estimate_memory(cfg, hw, train_len=t, lora=lora, offload=offload)
        if m.fits:
            advice.append(f"calibrate on shorter sequences: --train-len {t} fits here ({human_bytes(m.peak)}; "
                          f"positions are spread over the {ctx} target)")
            break
    if mem.activation_checkpointing:
        advice.append("activation checkpointing is already on (the planner enables it when activations do not fit)")
    return advice


def _lora_advice(cfg: ModelConfig, hw: Hardware, *, train_len: int, tokens: int) -> list[str]:
    """--lora when LongLoRA+ (the default settings, rank 16) fits the hardware the full fine-tune does not."""
    from .lora import lora_settings

    for rank in (16, 8):
        lora = lora_settings(rank).for_model(cfg)
        m = estimate_memory(cfg, hw, train_len=train_len, lora=lora)
        if m.fits:
            fpt = train_flops_per_token(cfg, train_len, activation_checkpointing=m.activation_checkpointing, lora=lora)
            hours = tokens * fpt / (hw.count * hw.effective_flops) / 3600
            where = f"{hw.count} x {hw.name}" if hw.count > 1 else hw.name
            return [f"calibrate with LoRA: --lora {rank} ({lora.describe()}) fits on {where} "
                    f"({human_bytes(m.peak)} per device, about {hours:.1f} h)"]
    return []


def default_out_dir(spec: str, ctx: int) -> Path:
    base = Path(spec.rstrip("/\\")).name or "model"
    base = re.sub(r"\.gguf$", "", base, flags=re.I)
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"
    return Path(f"{base}-{ctx // 1024}k" if ctx % 1024 == 0 else f"{base}-{ctx}")


# ------------------------------------------------------------------------------------------------
# Rendering


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def render_plan(plan: Plan) -> str:
    """The plan as the lines printed before a run (and as the whole output of --dry-run)."""
    lines = [f"plan: {plan.model} -> {plan.target_context} tokens"]

    def row(key: str, value: Any) -> None:
        lines.append(f"  {key:<22} {value}")

    row("model", f"{plan.architecture}, {plan.params / 1e6:,.1f}M parameters "
                 f"({plan.non_embedding_params / 1e6:,.1f}M non-embedding), shapes from {plan.model_source}")
    row("context", f"{plan.original_context} -> {plan.target_context} (scale factor {plan.factor:g})")
    row("recipe", f"{plan.recipe} (method {plan.method})")
    if plan.trains:
        h = plan.hyperparameters
        row("hyperparameters", f"lr {h['lr']:g}, AdamW betas ({h['betas'][0]:g}, {h['betas'][1]:g}), weight decay "
                               f"{h['weight_decay']:g}, warmup {h['warmup_steps']} steps from "
                               f"{h['warmup_start']:g} x lr, {h['schedule']} schedule")
        row("steps", f"{plan.steps} x {plan.global_batch} sequences of {plan.train_len} tokens "
                     f"(positions: {h['positions']})")
        row("sequences per step", f"{plan.global_batch} = {plan.micro_batch} per device x {plan.hardware['count']} "
                                  f"device(s) x {plan.grad_accumulation} accumulation")
        row("tokens", f"{plan.tokens:,}")
        if plan.lora:
            from .lora import LoraSettings

            row("training", f"{LoraSettings.from_dict(plan.lora).describe()}; {plan.memory['trainable_params']:,} "
                            f"trainable of {plan.params:,} parameters (frozen base in "
                            f"{'bf16' if plan.hardware['kind'] == 'cuda' else 'float32'})")
        m = plan.memory
        row("memory per device", f"{human_bytes(m['peak'])} peak of {human_bytes(m['capacity'])} usable "
                                 f"({'fits' if m['fits'] else 'DOES NOT FIT'})")
        shard = f" (sharded over {plan.hardware['count']})" if plan.hardware["count"] > 1 else ""
        row("  weights+grads+AdamW", f"{human_bytes(m['weights'])} + {human_bytes(m['gradients'])} + "
                                     f"{human_bytes(m['optimizer'])}{shard}"
                                     + (" in host memory (--offload)" if plan.offload else ""))
        if m["gathered_layers"]:
            row("  FSDP gathered layers", human_bytes(m["gathered_layers"]))
        ac = "on" if plan.activation_checkpointing else "off"
        row("  activations", f"{human_bytes(m['activations'])} without checkpointing, "
                             f"{human_bytes(m['activations_checkpointed'])} with (checkpointing {ac})")
        row("  loss head", f"{human_bytes(m['logits_chunked'])} chunked cross-entropy "
                           f"({human_bytes(m['logits_full'])} unchunked)")
        row("FLOPs per token", f"{plan.flops_per_token:.3g} ({'4N frozen + 6N trainable' if plan.lora else '6N'}"
                               f" + 12*L*H*Q*T, attention not halved"
                               f"{', x4/3 recompute' if plan.activation_checkpointing else ''})")
    else:
        row("training", "none: this recipe only writes the scaling")
    row("hardware", plan.hardware["description"])
    s = plan.seconds
    row("estimated time", f"{format_duration(s['total'])} (calibrate {format_duration(s['calibrate'])}, "
                          f"evaluate {format_duration(s['evaluate'])}, convert {format_duration(s['convert'])})")
    row("formats", ", ".join(plan.formats))
    row("output", str(Path(plan.outputs["run"]).parent))
    if plan.push:
        row("push", f"{plan.push} (only if the gate passes)")
    ev = plan.evaluation
    lengths = eval_lengths(plan.original_context, plan.target_context, ev.get("ctx"), ev.get("gate", True))
    row("evaluation", f"perplexity at {', '.join(map(str, lengths))}; passkey "
                      f"{ev.get('passkey_distances', 32)} distances x {ev.get('passkey_trials', 10)} keys; "
                      + ("gate from the recipe" if ev.get("gate", True) else "no gate (quick check)"))
    for n in plan.notes:
        lines.append(f"  note: {n}")
    for a in plan.advice:
        lines.append(f"  advice: {a}")
    return "\n".join(lines)


def refuse_if_unfit(plan: Plan) -> None:
    if plan.fits:
        return
    m = plan.memory
    raise PizooError(f"{plan.model}: the plan does not fit: it needs {human_bytes(m['peak'])} per device and "
                     f"{plan.hardware['name']} has {human_bytes(m['capacity'])} usable; " + "; ".join(plan.advice))
