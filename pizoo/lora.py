"""LoRA for calibration (LongLoRA+): low-rank adapters on the projections, embeddings and norms trainable.

LongLoRA (arXiv 2309.12307) calibrates a long context on one GPU with rank-r adapters on the
attention projections plus trainable embeddings and norms; plain LoRA (adapters only) leaves a
large perplexity gap at long context, the trainable embeddings and norms close it.

- `LoraSettings`: rank, alpha, target projections and trainable extras, validated (one-line errors).
- `LoRALinear`: an nn.Linear (same `weight`/`bias`, so HF names still load) plus `lora_A` [r, in]
  and `lora_B` [out, r]; y = W x + b + (alpha / r) B A x. B starts at zero, so training starts
  from the base model exactly. Module and parameter names are PEFT's, so the adapter file is the
  state dict under PEFT's prefix.
- `apply_lora(model, settings)`: swaps the target projections, freezes everything else except the
  trainable extras (and CLEX's frequency module, which keeps training).
- `merged_tensors(...)`: streams the model's tensors with W' = W + (alpha / r) B A, collecting the
  adapter (LoRA matrices + the `modules_to_save` tensors) on the side for `write_peft_adapter`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PizooError

# --lora-targets names a projection by its module name without "_proj" (q, k, v, o, gate, up,
# down for the Llama block). The names a model has come from its family's tensor table
# (pizoo.families), so a family with other projections gets them without a change here.
ALL = "all"  # every projection of the family's layers (attention and MLP)
# --lora-trainable: parameters trained in full besides the adapters, by a word in their name.
TRAINABLE = {"embed": "embed", "norm": "norm", "head": "lm_head"}
DEFAULT_TRAINABLE = ("embed", "norm")  # LongLoRA+
ADAPTER_DIR = "adapter"  # the PEFT adapter's folder inside a calibrated model's folder
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    # short names ("q", "gate", ...); () = the family's attention projections, ("all",) = every
    # projection; `for_model` turns both into the model's concrete names.
    targets: tuple[str, ...] = ()
    trainable: tuple[str, ...] = DEFAULT_TRAINABLE  # keys of TRAINABLE

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def target_modules(self) -> list[str]:
        if not self.targets or self.targets == (ALL,):
            raise ValueError("LoraSettings.target_modules before for_model(): the targets are not resolved")
        return [f"{t}_proj" for t in self.targets]

    @property
    def kind(self) -> str:
        return "LongLoRA+" if self.trainable else "plain LoRA"

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "trainable": list(self.trainable), "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraSettings":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                   trainable=tuple(d["trainable"]))

    def describe(self) -> str:
        extra = f" + trainable {', '.join(self.trainable)}" if self.trainable else ""
        on = ",".join(self.targets) if self.targets else "the attention projections"
        return f"{self.kind}: rank {self.rank}, alpha {self.alpha:g} on {on}{extra}"

    def for_model(self, cfg) -> "LoraSettings":
        """These settings with the targets resolved against the model's family (its tensor table):
        the default becomes the attention projections, `all` every projection; an unknown name or
        a rank above an adapted layer's width is a one-line error."""
        targets = resolved_targets(self, cfg)
        resolved = LoraSettings(self.rank, self.alpha, targets, self.trainable)
        width = min(min(t.shape) for t in adapted_tensors(resolved, cfg))
        if self.rank > width:
            raise PizooError(f"--lora {self.rank}: above the width of the adapted layers ({width}); use a rank of at "
                             f"most {width} (a full-rank adapter is a full fine-tune: drop --lora)")
        return resolved


def parse_targets(text: str | None) -> tuple[str, ...]:
    """'q,k,v,o' or any comma-separated projection names ('q_proj' works too), 'all', or nothing for
    the family's attention projections. Checked against the model by LoraSettings.for_model."""
    if text is None or not text.strip():
        return ()
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    if ALL in parts:
        if len(parts) > 1:
            raise PizooError(f"--lora-targets {text}: 'all' stands alone (every projection of the model)")
        return (ALL,)
    out: list[str] = []
    for p in parts:
        name = p.removesuffix("_proj")
        if not name.isidentifier():
            raise PizooError(f"--lora-targets {text}: unknown target '{p}'; use projection names such as q,k,v,o "
                             "or 'all'")
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_trainable(text: str | None) -> tuple[str, ...]:
    """'embed,norm' (default, LongLoRA+), 'none' (plain LoRA), or a subset of embed, norm, head."""
    if text is None or not text.strip():
        return DEFAULT_TRAINABLE
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    if parts == ["none"]:
        return ()
    out: list[str] = []
    for p in parts:
        if p not in TRAINABLE:
            raise PizooError(f"--lora-trainable {text}: unknown '{p}'; use 'none' or a comma-separated subset of "
                             f"{','.join(TRAINABLE)}")
        if p not in out:
            out.append(p)
    return tuple(out)


def lora_settings(rank: int | None, *, alpha: float | None = None, targets: str | tuple[str, ...] | None = None,
                  trainable: str | tuple[str, ...] | None = None) -> LoraSettings | None:
    """Settings from the command-line values (None when --lora is not given); alpha defaults to 2r."""
    if rank is None:
        for flag, value in (("--lora-alpha", alpha), ("--lora-targets", targets), ("--lora-trainable", trainable)):
            if value is not None:
                raise PizooError(f"{flag}: only with --lora RANK")
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise PizooError(f"--lora {rank}: the rank must be a positive integer (LongLoRA uses 8; 16-64 is common)")
    a = float(2 * rank if alpha is None else alpha)
    if not (math.isfinite(a) and a > 0):
        raise PizooError(f"--lora-alpha {alpha}: must be a positive number (default: 2 x rank)")
    t = targets if isinstance(targets, tuple) else parse_targets(targets)
    tr = trainable if isinstance(trainable, tuple) else parse_trainable(trainable)
    return LoraSettings(rank=rank, alpha=a, targets=t, trainable=tr)


def projections(cfg) -> dict[str, bool]:
    """The projections LoRA can adapt, from the family's tensor table (layer 0): short name ->
    whether it is an attention projection. A projection is a 2-D `*_proj.weight` of a layer."""
    out: dict[str, bool] = {}
    for t in cfg.family.layer_tensors(cfg, 0):
        module = t.hf.removesuffix(".weight")
        leaf = module.rsplit(".", 1)[-1]
        if t.hf.endswith(".weight") and len(t.shape) == 2 and leaf.endswith("_proj"):
            out.setdefault(leaf.removesuffix("_proj"), ".self_attn." in t.hf)
    return out


def resolved_targets(settings: LoraSettings, cfg) -> tuple[str, ...]:
    """The short names of the projections `settings` adapts in this model (see for_model)."""
    available = projections(cfg)
    if not settings.targets:
        return tuple(n for n, attention in available.items() if attention)
    if settings.targets == (ALL,):
        return tuple(available)
    unknown = [t for t in settings.targets if t not in available]
    if unknown:
        raise PizooError(f"--lora-targets {','.join(settings.targets)}: unknown target '{unknown[0]}'; "
                         f"{cfg.family.hf_class} has {','.join(available)} (or 'all')")
    return settings.targets


def adapted_tensors(settings: LoraSettings, cfg) -> list:
    """The tensor-table rows (every layer) of the weights that get an adapter."""
    wanted = {f"{t}_proj" for t in resolved_targets(settings, cfg)}
    return [t for t in cfg.family.tensors(cfg) if t.layer is not None and t.hf.endswith(".weight")
            and t.hf.removesuffix(".weight").rsplit(".", 1)[-1] in wanted]


def for_run(settings: LoraSettings | None, recipe, cfg) -> LoraSettings | None:
    """The settings a calibration (or its plan) uses: refused for a recipe with nothing to train,
    else resolved against the model (LoraSettings.for_model)."""
    if settings is None:
        return None
    if cfg.family.lora_refusal:
        raise PizooError(cfg.family.lora_refusal)
    if not recipe.train:
        raise PizooError(f"--lora with recipe '{recipe.name}': {recipe.method} scales RoPE at inference and has "
                         "nothing to train; drop --lora or choose a trained recipe (pi, yarn, clex, ...)")
    return settings.for_model(cfg)


def adapter_params(settings: LoraSettings, cfg) -> int:
    """Parameters in the LoRA matrices: r * (in + out) per adapted weight [out, in]."""
    return sum(settings.rank * sum(t.shape) for t in adapted_tensors(settings, cfg))


def extra_trainable_params(settings: LoraSettings, cfg) -> int:
    """Parameters of the embeddings, norms (and head) that --lora-trainable keeps trainable, from
    the family's tensor table (a tied head is the embedding, counted once)."""
    return sum(math.prod(t.shape) for t in cfg.family.tensors(cfg) if is_trainable(t.hf, settings))


# ------------------------------------------------------------------------------------------------
# The module


class LoRALinear(nn.Linear):
    """nn.Linear + a rank-r update: y = x W^T + b + scaling * (x A^T) B^T.

    Subclassing nn.Linear keeps the base `weight`/`bias` names, so HF checkpoints load unchanged,
    and `lora_A`/`lora_B` are nn.Linear children as in PEFT (`...q_proj.lora_A.weight`).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.scaling = scaling

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, scaling: float) -> "LoRALinear":
        """A LoRALinear that shares `linear`'s weight and bias Parameters (no copy)."""
        with torch.device(linear.weight.device):
            new = cls(linear.in_features, linear.out_features, rank, scaling, bias=linear.bias is not None,
                      dtype=linear.weight.dtype)
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scaling

    def delta(self) -> torch.Tensor:
        """scaling * B A in float32: what merging adds to the weight."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Swap every target projection of `model` (a pizoo LlamaModel) for a LoRALinear and set which
    parameters train: the adapters, the `trainable` extras and CLEX's frequency module (`rotary.`).
    Returns the names of the swapped modules. Works on the meta device (before weights exist)."""
    settings = settings.for_model(model.config)  # the family's projection names
    wanted = set(settings.target_modules)
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in wanted and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear.wrap(child, settings.rank, settings.scaling))
                swapped.append(f"{name}.{child_name}" if name else child_name)
    if not swapped:
        raise PizooError(f"--lora-targets {','.join(settings.targets)}: the model has no such projections")
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, settings))
    return swapped


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def is_trainable(name: str, settings: LoraSettings) -> bool:
    """Whether parameter `name` (model-relative, HF names) trains under these settings."""
    if is_lora_param(name) or name.startswith("rotary."):
        return True
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    return any(TRAINABLE[t] in leaf for t in settings.trainable)


def init_adapter_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Initial LoRA matrices (model-relative names), the same on every rank: A Kaiming-uniform as
    nn.Linear (and PEFT) initialise it, B zero, so the adapted model starts equal to the base."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a = torch.empty(m.lora_A.weight.shape)
            bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
            out[f"{name}.lora_A.weight"] = a.uniform_(-bound, bound, generator=gen)
            out[f"{name}.lora_B.weight"] = torch.zeros(m.lora_B.weight.shape)
    return out


# ------------------------------------------------------------------------------------------------
# Merge and the PEFT adapter


def merged_tensors(tensors: Iterable[tuple[str, torch.Tensor]], settings: LoraSettings,
                   adapter: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF-named tensors with every adapted weight merged (W + scaling * B A, in float32).

    A weight is held back only until its two LoRA matrices arrive (state-dict order puts them
    right after it), so memory stays one projection. The LoRA matrices and the trainable extras
    are copied into `adapter` (HF names) for `write_peft_adapter`.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        if is_lora_param(name):
            adapter[name] = t.detach().clone()
            module, kind = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            slot = pending.setdefault(module, {})
            slot[kind] = t
            if {"weight", "lora_A", "lora_B"} <= slot.keys():
                yield _merge(module, pending.pop(module), settings.scaling)
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in settings.target_modules:
            pending.setdefault(module, {})["weight"] = t
            continue
        if is_trainable(name, settings):
            adapter[name] = t.detach().clone()
        yield name, t
    if pending:
        raise PizooError(f"LoRA merge: no adapter for '{next(iter(pending))}'; the training state is incomplete")


def _merge(module: str, parts: dict[str, torch.Tensor], scaling: float) -> tuple[str, torch.Tensor]:
    w = parts["weight"]
    merged = w.float() + scaling * (parts["lora_B"].float() @ parts["lora_A"].float())
    return f"{module}.weight", merged


def modules_to_save(adapter: dict[str, torch.Tensor]) -> list[str]:
    """PEFT's modules_to_save: the leaf module name of every fully trained tensor (matched by suffix)."""
    names = []
    for name in adapter:
        if not is_lora_param(name):
            leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def write_peft_adapter(folder: Path, settings: LoraSettings, adapter: dict[str, torch.Tensor], *,
                       base_model: str, tied_embeddings: bool) -> None:
    """adapter_config.json + adapter_model.safetensors in PEFT's layout (keys under `base_model.model.`).

    PEFT replaces each modules_to_save module by a trained copy. With tied embeddings the head is a
    separate module in transformers that shares the embedding's weight; the copy of the embedding
    would not reach it, so the trained embedding is also saved as `lm_head`.
    """
    from .checkpoint import write_safetensors
    from .fsutil import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.float().contiguous() for k, v in adapter.items()}
    if tied_embeddings and "model.embed_tokens.weight" in adapter:
        tensors[PEFT_PREFIX + "lm_head.weight"] = adapter["model.embed_tokens.weight"].float().clone()
    saved = modules_to_save({k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()})
    write_safetensors(folder / "adapter_model.safetensors", sorted(tensors.items()), metadata={"format": "pt"})
    atomic_write_json(folder / "adapter_config.json", peft_config(settings, base_model, saved))


def peft_config(settings: LoraSettings, base_model: str, saved: list[str]) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha,
        "lora_dropout": 0.0,
        "target_modules": settings.target_modules,
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
