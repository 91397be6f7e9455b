"""Recipes as data: one TOML file per context-extension method.

A recipe holds the method's RoPE parameters, the calibration fine-tune's hyperparameters from the
method's paper (optimizer betas, lr by model size, warmup, schedule, steps, global batch in
sequences), the evaluation gate thresholds and a citation. The built-in recipes live in the
top-level `recipes/` folder of the repository; `load_recipe` accepts a built-in name or the path of
the user's own TOML file.

Where built-in recipes are found, in order:
1. `$PIZOO_RECIPES` (one folder, or several separated by os.pathsep), for site-specific recipes;
2. `recipes/` next to the `pizoo` package (a source checkout or an editable `pip install -e .`);
3. `<sys.prefix>/share/pizoo/recipes` (a wheel install: pyproject's `data-files` puts them there).

A file is validated completely: unknown keys, wrong types and impossible values are errors that
name the file and the key (`recipes/pi.toml: [train] lr: must be > 0, got -1`).
"""

from __future__ import annotations

import math
import os
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import METHOD_KEYS, RopeConfig
from .errors import PizooError

# Recipe method -> the RoPE type pizoo computes (PI is linear interpolation).
RECIPE_METHODS = {"linear": "linear", "pi": "linear", "ntk": "ntk", "dynamic": "dynamic", "yarn": "yarn",
                  "llama3": "llama3", "clex": "clex"}
SCHEDULES = ("constant", "cosine")
POSITION_SAMPLERS = ("pose", "sorted-random")


@dataclass
class GateThresholds:
    """The evaluation gate: a calibrated model must keep perplexity and find the passkey.

    max_ppl_ratio_target: perplexity at the target length / the base's at its original length.
    max_ppl_ratio_original: the calibrated model's perplexity at the original length / the base's.
    min_passkey_accuracy: passkey retrieval accuracy required on average over the tested distances
        (and half of it at every distance).
    min_task_score: long-context task -> the score (0-1) it must reach at the target context
        (`pizoo.eval.tasks`; none by default). The evaluation runs these tasks when the gate is on.
    """

    max_ppl_ratio_target: float = 1.10
    max_ppl_ratio_original: float = 1.05
    min_passkey_accuracy: float = 0.9
    min_task_score: dict[str, float] = field(default_factory=dict)


@dataclass
class LrRule:
    """Use `lr` for models with at most `max_params` parameters (inf: every larger model)."""

    max_params: float
    lr: float


@dataclass
class Recipe:
    name: str
    method: str  # the pizoo RoPE type: linear, ntk, dynamic, yarn, llama3, clex
    description: str
    citation: str
    rope: dict[str, Any] = field(default_factory=dict)  # the method's own parameters (besides factor)
    train: bool = True  # false: the method needs no fine-tune (dynamic NTK); calibrate only writes the config
    lr: list[LrRule] = field(default_factory=lambda: [LrRule(math.inf, 2e-5)])
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    warmup_ratio: float | None = None  # when set, warmup is this fraction of the steps instead
    warmup_start: float = 0.1  # warmup starts at this fraction of the peak lr
    schedule: str = "constant"
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of the peak lr
    steps: int = 1000
    global_batch: int = 64  # sequences per optimizer step
    positions: str = "pose"  # short-sequence calibration (train_len < ctx): pose | sorted-random
    gate: GateThresholds = field(default_factory=GateThresholds)
    path: str | None = None

    def lr_for(self, num_params: int) -> float:
        """The peak learning rate for a model of `num_params` parameters."""
        for rule in self.lr:
            if num_params <= rule.max_params:
                return rule.lr
        return self.lr[-1].lr

    def warmup_for(self, steps: int) -> int:
        if self.warmup_ratio is not None:
            return int(math.ceil(self.warmup_ratio * steps))
        return min(self.warmup_steps, steps)

    def rope_config(self, base: RopeConfig, factor: float, original_context: int) -> RopeConfig:
        """The scaled RoPE this recipe gives a base model extended by `factor`."""
        return base.scaled(self.method, factor, original_context, **self.rope)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["lr"] = [{"max_params": r.max_params if math.isfinite(r.max_params) else "inf", "lr": r.lr} for r in self.lr]
        return d


# ------------------------------------------------------------------------------------------------
# Finding recipes


def recipe_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("PIZOO_RECIPES")
    if env:
        dirs.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    dirs.append(Path(__file__).resolve().parent.parent / "recipes")
    dirs.append(Path(sys.prefix) / "share" / "pizoo" / "recipes")
    return [d for d in dirs if d.is_dir()]


def list_recipes() -> list[str]:
    """Names of the built-in recipes (first folder wins when a name appears twice)."""
    names: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.toml")):
            names.setdefault(p.stem, p)
    return sorted(names)


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    spec = str(name_or_path)
    p = Path(spec).expanduser()
    if p.suffix == ".toml" or os.sep in spec or "/" in spec:
        if not p.is_file():
            raise PizooError(f"{p}: recipe file not found")
        return p
    for d in recipe_dirs():
        cand = d / f"{spec}.toml"
        if cand.is_file():
            return cand
    known = ", ".join(list_recipes()) or "none found"
    raise PizooError(f"--recipe {spec}: no such recipe; use one of {known}, or the path of a .toml file")


def load_recipe(name_or_path: str | os.PathLike | Recipe) -> Recipe:
    """A built-in recipe by name, or a user's TOML file, validated."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    path = recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise PizooError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise PizooError(f"{path}: cannot read: {e.strerror}") from None
    return parse_recipe(data, str(path), default_name=path.stem)


# ------------------------------------------------------------------------------------------------
# Validation


def _task_scores(table: "_Table") -> dict[str, float]:
    """[gate.min_task_score]: task = minimum score in [0, 1]; every task must be one pizoo runs."""
    from .eval.tasks import TASKS  # here, not at the top: pizoo.eval imports this module

    for key in table.data:
        if key not in TASKS:
            raise table.fail(key, f"unknown task; use some of: {', '.join(TASKS)}")
    scores = {k: table.get(k, float, check=lambda v: 0 <= v <= 1, hint="must be in [0, 1]") for k in table.data}
    table.finish()
    return scores


class _Table:
    """Typed access to one TOML table; every error names the file, the table and the key."""

    def __init__(self, data: Any, file: str, table: str | None):
        self.file, self.table = file, table
        if not isinstance(data, dict):
            raise PizooError(f"{file}: [{table}] must be a table, got {type(data).__name__}")
        self.data = data
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.file}: [{self.table}] {key}" if self.table else f"{self.file}: {key}"

    def fail(self, key: str, msg: str) -> PizooError:
        return PizooError(f"{self.where(key)}: {msg}")

    def get(self, key: str, kind: type | tuple, default: Any = ..., check=None, hint: str = "") -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "missing required key")
            return default
        v = self.data[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
            name = "/".join(k.__name__ for k in kinds)
            raise self.fail(key, f"must be {name}, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v) and not (check and check(v)):
            raise self.fail(key, f"must be a finite number, got {v!r}")
        if check is not None and not check(v):
            raise self.fail(key, f"{hint}, got {v!r}")
        return v

    def sub(self, key: str) -> "_Table":
        self.used.add(key)
        name = f"{self.table}.{key}" if self.table else key
        return _Table(self.data.get(key, {}), self.file, name)

    def finish(self, allowed_extra: tuple[str, ...] = ()) -> None:
        for key in self.data:
            if key not in self.used and key not in allowed_extra:
                known = ", ".join(sorted(self.used))
                raise self.fail(key, f"unknown key; known keys here: {known}")


def _parse_lr(top: _Table, train: _Table) -> list[LrRule]:
    train.used.add("lr")
    raw = train.data.get("lr", 2e-5)
    where = train.where("lr")
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        lr = train.get("lr", float, 2e-5, lambda v: 0 < v < 1, "must be > 0 and < 1")
        return [LrRule(math.inf, float(lr))]
    if isinstance(raw, list) and raw and all(isinstance(r, dict) for r in raw):
        rules = raw
    else:
        raise PizooError(f"{where}: must be a number or an array of {{max_params, lr}} tables, got {raw!r}")
    out: list[LrRule] = []
    for i, r in enumerate(rules):
        t = _Table(r, top.file, f"train.lr[{i}]")
        max_params = t.get("max_params", (int, float), math.inf, lambda v: v > 0, "must be > 0 (inf for the rest)")
        lr = t.get("lr", float, check=lambda v: 0 < v < 1, hint="must be > 0 and < 1")
        t.finish()
        if out and max_params <= out[-1].max_params:
            raise PizooError(f"{where}: max_params must increase from one rule to the next "
                             f"({max_params:g} after {out[-1].max_params:g})")
        out.append(LrRule(float(max_params), float(lr)))
    return out


def parse_recipe(data: dict[str, Any], file: str, default_name: str = "recipe") -> Recipe:
    """Validate a recipe's parsed TOML (see recipes/pi.toml for the layout)."""
    top = _Table(data, file, None)
    name = top.get("name", str, default_name, lambda v: bool(v.strip()), "must not be empty")
    method = top.get("method", str, check=lambda v: v in RECIPE_METHODS,
                     hint=f"must be one of {', '.join(RECIPE_METHODS)}")
    method = RECIPE_METHODS[method]
    description = top.get("description", str, "")
    citation = top.get("citation", str, check=lambda v: bool(v.strip()), hint="must name the paper")

    rope_t = top.sub("rope")
    rope: dict[str, Any] = {}
    for key in METHOD_KEYS[method]:
        if key in ("short_factor", "long_factor"):
            continue
        if key in rope_t.data:
            default = getattr(RopeConfig(), key)
            kind: Any = type(default) if default is not None else float
            if kind is int:
                kind = int
            check, hint = None, ""
            if key in ("beta_fast", "beta_slow", "max_factor", "time_dt", "low_freq_factor", "high_freq_factor",
                       "attention_factor", "mscale", "mscale_all_dim", "param_factor"):
                check, hint = (lambda v: v > 0), "must be > 0"
            if key == "act":
                check, hint = (lambda v: v in ("silu", "tanh")), "must be silu or tanh"
            rope[key] = rope_t.get(key, kind, check=check, hint=hint)
    rope_t.finish()
    if method == "yarn" and rope.get("beta_fast", 32.0) <= rope.get("beta_slow", 1.0):
        raise rope_t.fail("beta_fast", "must exceed beta_slow")
    if method == "llama3" and rope.get("high_freq_factor", 4.0) <= rope.get("low_freq_factor", 1.0):
        raise rope_t.fail("high_freq_factor", "must exceed low_freq_factor")
    if method == "clex" and rope.get("max_factor", 16.0) < 1:
        raise rope_t.fail("max_factor", "must be >= 1")

    train = top.sub("train")
    trains = train.get("enabled", bool, method != "dynamic")
    lr = _parse_lr(top, train)
    betas = train.get("betas", list, [0.9, 0.95],
                      lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                    and 0 <= b < 1 for b in v),
                      "must be two numbers in [0, 1)")
    weight_decay = train.get("weight_decay", float, 0.0, lambda v: v >= 0, "must be >= 0")
    warmup_steps = train.get("warmup_steps", int, 20, lambda v: v >= 0, "must be >= 0")
    warmup_ratio = train.get("warmup_ratio", float, None, lambda v: 0 <= v < 1, "must be in [0, 1)")
    if "warmup_steps" in train.data and "warmup_ratio" in train.data:
        raise train.fail("warmup_ratio", "give warmup_steps or warmup_ratio, not both")
    warmup_start = train.get("warmup_start", float, 0.1, lambda v: 0 < v <= 1, "must be in (0, 1]")
    schedule = train.get("schedule", str, "constant", lambda v: v in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}")
    min_lr_ratio = train.get("min_lr_ratio", float, 0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]")
    steps = train.get("steps", int, 1000 if trains else 0, lambda v: v >= 0, "must be >= 0")
    if trains and steps == 0:
        raise train.fail("steps", "must be > 0 when training is enabled (set enabled = false for no fine-tune)")
    global_batch = train.get("global_batch", int, 64, lambda v: v >= 1, "must be >= 1")
    positions = train.get("positions", str, "sorted-random" if method == "clex" else "pose",
                          lambda v: v in POSITION_SAMPLERS, f"must be one of {', '.join(POSITION_SAMPLERS)}")
    train.finish()

    gate_t = top.sub("gate")
    gate = GateThresholds(
        max_ppl_ratio_target=gate_t.get("max_ppl_ratio_target", float, 1.10, lambda v: v >= 1, "must be >= 1"),
        max_ppl_ratio_original=gate_t.get("max_ppl_ratio_original", float, 1.05, lambda v: v >= 1, "must be >= 1"),
        min_passkey_accuracy=gate_t.get("min_passkey_accuracy", float, 0.9, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        min_task_score=_task_scores(gate_t.sub("min_task_score")),
    )
    gate_t.finish()
    top.finish()
    return Recipe(name=name, method=method, description=description, citation=citation, rope=rope, train=trains,
                  lr=lr, betas=(float(betas[0]), float(betas[1])), weight_decay=weight_decay,
                  warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, warmup_start=warmup_start,
                  schedule=schedule, min_lr_ratio=min_lr_ratio, steps=steps, global_batch=global_batch,
                  positions=positions, gate=gate, path=file)
