"""The model card (README.md) of a published context-extended model.

YAML metadata the Hub indexes (base_model + base_model_relation finetune, library_name, tags,
license inherited from the base, model-index perplexity results), then a body that says what was
done, from which base, with which result, how to use every format, and the pizoo command that
reproduces it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .data import DEFAULT_CORPUS_NAME
from .fsutil import human_bytes
from .lineage import LOCAL_MODEL, Identity, base_identity, card_license

# What users call each method, and the tag the card gets for it.
METHOD_NAMES = {
    "pi": "Position Interpolation", "linear": "Position Interpolation", "ntk": "NTK-aware scaling",
    "dynamic": "dynamic NTK scaling", "dynamic-ntk": "dynamic NTK scaling", "yarn": "YaRN",
    "llama3": "Llama-3 style scaling", "longrope": "LongRoPE", "clex": "CLEX",
}
# Short labels used in file names (SmolLM2-135M-32K-PI-Q8_0.gguf).
METHOD_LABELS = {
    "pi": "PI", "linear": "PI", "ntk": "NTK", "dynamic": "DynNTK", "dynamic-ntk": "DynNTK", "yarn": "YaRN",
    "llama3": "Llama3", "longrope": "LongRoPE", "clex": "CLEX",
}


@dataclass
class CardFacts:
    """Everything the card states, gathered from the release folder by pizoo.hub."""

    repo_id: str
    config: dict  # the HF config.json
    calibration: dict | None = None  # calibration.json
    evaluation: dict | None = None  # eval.json
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in repo, bytes), README excluded
    gguf_files: list[str] = field(default_factory=list)  # paths in repo
    trtllm_build: str | None = None  # the trtllm-build command, relative to the repo layout
    plot: str | None = None  # path in repo of the perplexity plot
    license: str | None = None  # inherited from the base; None when unknown
    forced: bool = False  # pushed with --force past a failed or missing gate
    reproduce: str | None = None  # the pizoo command that makes this model
    quant_quality: list[dict] | None = None  # the GGUF ladder measured in llama.cpp (see quant_ladder_section)
    base: Identity | None = None  # the base's public identity (default: from the records)

    @property
    def base_identity(self) -> Identity:
        return self.base if self.base is not None else base_identity(self.config, self.calibration)


# --------------------------------------------------------------------------------------------
# Facts derived from calibration.json / config.json


def method_of(config: dict, calibration: dict | None) -> str | None:
    calib = calibration or {}
    recipe = calib.get("recipe") if isinstance(calib.get("recipe"), dict) else {}
    return (calib.get("method") or recipe.get("method") or recipe.get("name")
            or (config.get("pizoo") or {}).get("rope_method"))


def context_of(config: dict, calibration: dict | None) -> int | None:
    calib = calibration or {}
    return calib.get("ctx") or (config.get("pizoo") or {}).get("target_context") or config.get("max_position_embeddings")


def original_context_of(config: dict, calibration: dict | None) -> int | None:
    calib = calibration or {}
    if calib.get("original_context"):
        return calib["original_context"]
    scaling = config.get("rope_scaling") or {}
    return scaling.get("original_max_position_embeddings")


def factor_of(config: dict, calibration: dict | None) -> float | None:
    calib = calibration or {}
    if calib.get("factor"):
        return calib["factor"]
    ctx, orig = context_of(config, calib), original_context_of(config, calib)
    return round(ctx / orig, 4) if ctx and orig else (config.get("rope_scaling") or {}).get("factor")


def base_id_of(config: dict, calibration: dict | None) -> str:
    """How published text names the base: its Hub id, its public name, or "a local model" (never a path)."""
    return base_identity(config, calibration).label


def hub_base_id_of(config: dict, calibration: dict | None) -> str | None:
    """The base's Hub id, or None when it has none (the Hub rejects a card whose `base_model` is not a
    model id)."""
    return base_identity(config, calibration).hub_id


def public_arg(arg: str) -> str:
    """A command-line argument as published: an absolute (or ~) path becomes its last component."""
    if arg.startswith(("/", "~")) and Path(arg).expanduser().name:
        return Path(arg).expanduser().name
    return arg


def context_label(ctx: int) -> str:
    """32768 -> '32K'; lengths that are not whole KiB multiples stay as numbers."""
    return f"{ctx // 1024}K" if ctx % 1024 == 0 else str(ctx)


def reproduce_command(calibration: dict | None, run: dict | None, config: dict) -> str | None:
    """The exact command from run.json when `pizoo extend` recorded it, else one rebuilt from calibration.json."""
    run = run or {}
    calib = calibration or {}
    for key in ("command", "argv"):
        cmd = run.get(key)
        if isinstance(cmd, list) and cmd:
            return shlex.join(public_arg(str(c)) for c in cmd)
        if isinstance(cmd, str) and cmd.strip():
            return shlex.join(public_arg(c) for c in shlex.split(cmd.strip()))
        if isinstance(cmd, dict) and cmd.get("model") and cmd.get("ctx"):
            return _extend_command(cmd, calib)
    base = calib.get("base_model") if isinstance(calib.get("base_model"), dict) else {}
    base = base_identity(config, calib).hub_id or base.get("spec")
    ctx = context_of(config, calib)
    if not (base and ctx):
        return None
    recipe = calib.get("recipe") if isinstance(calib.get("recipe"), dict) else {}
    recipe_name = recipe.get("name") or calib.get("method")
    data = [s for s in (calib.get("data") or {}).get("sources") or [] if s != DEFAULT_CORPUS_NAME]
    return _extend_command({"model": base, "ctx": ctx, "recipe": recipe_name, "data": data or None,
                            "steps": calib.get("steps"), "train_len": calib.get("train_len")}, calib)


# What `pizoo extend` uses when an option is not given (pizoo.pipeline.ExtendOptions).
_EXTEND_DEFAULTS = {"recipe": "pi", "formats": ["hf", "gguf", "trtllm"], "gguf_dtype": "f16", "tp": 1, "seed": 0,
                    "eval": "full"}


def _extend_command(cmd: dict, calib: dict) -> str:
    """`pizoo extend ...` from run.json's `command` record (pipeline's options), with the global batch
    that calibration.json recorded when the record lacks it. Defaults are left out; --push and --out too."""
    parts = ["pizoo", "extend", public_arg(str(cmd["model"])), "--ctx", str(cmd["ctx"])]
    if cmd.get("recipe"):
        parts += ["--recipe", public_arg(str(cmd["recipe"]))]
    for src in cmd.get("data") or []:
        parts += ["--data", public_arg(str(src))]
    for key, flag in (("steps", "--steps"), ("train_len", "--train-len")):
        if cmd.get(key) is not None:
            parts += [flag, str(cmd[key])]
    batch = cmd.get("global_batch") if cmd.get("global_batch") is not None else calib.get("global_batch")
    if batch is not None:
        parts += ["--global-batch", str(batch)]
    formats = cmd.get("formats")
    if formats and sorted(formats) != sorted(_EXTEND_DEFAULTS["formats"]):
        parts += ["--formats", ",".join(formats)]
    for key, flag in (("gguf_dtype", "--gguf-dtype"), ("tp", "--tp"), ("seed", "--seed"), ("eval", "--eval")):
        if cmd.get(key) is not None and cmd[key] != _EXTEND_DEFAULTS[key]:
            parts += [flag, str(cmd[key])]
    if cmd.get("eval_ctx"):
        parts += ["--eval-ctx", ",".join(str(c) for c in cmd["eval_ctx"])]
    lora = cmd.get("lora") or calib.get("lora")
    if isinstance(lora, dict) and lora.get("rank"):
        targets = ",".join(lora.get("targets") or [])  # empty: the default (attention projections)
        parts += ["--lora", str(lora["rank"]), "--lora-alpha", _num(lora.get("alpha")),
                  *(["--lora-targets", targets] if targets else []),
                  "--lora-trainable", ",".join(lora.get("trainable") or []) or "none"]
    if cmd.get("offload"):
        parts.append("--offload")
    return shlex.join(parts)


# --------------------------------------------------------------------------------------------
# Rendering


def card_metadata(facts: CardFacts) -> dict[str, Any]:
    cfg, calib = facts.config, facts.calibration
    method = method_of(cfg, calib)
    rope_method = (cfg.get("pizoo") or {}).get("rope_method")
    tags = ["context-extension", "rope-scaling"]
    for t in (method, rope_method):
        if t and t not in tags:
            tags.append(str(t))
    if facts.gguf_files:
        tags.append("gguf")
    if facts.trtllm_build:
        tags.append("tensorrt-llm")
    tags.append("pizoo")
    meta: dict[str, Any] = {}
    if facts.license:
        meta["license"] = facts.license
    base = facts.base_identity.hub_id
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "finetune"
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = tags
    results = [r for r in (facts.evaluation or {}).get("results") or [] if r.get("ppl") is not None]
    if results:
        dataset = _eval_dataset(facts.evaluation)
        meta["model-index"] = [{
            "name": facts.repo_id.split("/")[-1],
            "results": [{
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"type": dataset, "name": dataset},
                "metrics": [{"type": "perplexity", "value": round(float(r["ppl"]), 4),
                             "name": f"Perplexity @ {r['ctx']} tokens"} for r in results],
            }],
        }]
    return meta


def _eval_dataset(evaluation: dict | None) -> str:
    data = (evaluation or {}).get("data")
    if isinstance(data, dict):
        name = data.get("name") or ", ".join(str(s) for s in data.get("sources") or [])
        if name:
            return name
    if isinstance(data, str) and data:
        return data
    return "pizoo-eval-corpus"


def render_card(facts: CardFacts) -> str:
    """README.md text: YAML front matter, then the body."""
    meta = yaml.safe_dump(card_metadata(facts), sort_keys=False, allow_unicode=True)
    return f"---\n{meta}---\n\n{_body(facts)}"


def _skipped(ev: dict) -> str:
    """What a forced push went past, exactly: a failed gate, a gate that was not applied to an
    evaluation that ran, or no evaluation at all."""
    gate = ev.get("gate")
    if isinstance(gate, dict) and gate.get("passed") is False:
        return f"its evaluation gate failed ({'; '.join(failing_reasons(gate)) or 'no reasons recorded'})"
    if ev.get("results") or ev.get("passkey"):
        return ("its evaluation gate was not applied: an evaluation ran without the gate (e.g. `--eval quick`), "
                "so nothing was checked against thresholds")
    return "no evaluation ran (neither the measurements nor the gate)"


def _body(facts: CardFacts) -> str:
    cfg, calib, ev = facts.config, facts.calibration or {}, facts.evaluation or {}
    name = facts.repo_id.split("/")[-1]
    method = method_of(cfg, calib)
    method_name = METHOD_NAMES.get(str(method), str(method or "RoPE scaling"))
    ctx, orig, factor = context_of(cfg, calib), original_context_of(cfg, calib), factor_of(cfg, calib)
    ident = facts.base_identity
    base = ident.label
    out: list[str] = [f"# {name}", ""]
    span = f"from {orig:,} to {ctx:,} tokens" if orig and ctx else f"to {ctx:,} tokens" if ctx else ""
    named = f"[{ident.hub_id}]({ident.repo_url})" if ident.hub_id else (ident.name or LOCAL_MODEL.capitalize())
    out.append(f"{named} with its context window extended {span}"
               f"{f' (factor {factor:g})' if factor else ''} by **{method_name}**, calibrated and evaluated "
               f"with [pizoo](https://pypi.org/project/pizoo/) {__version__}.")
    out.append("")
    if ident.quantization:
        out += [f"The base weights were dequantized from a {ident.quantization} GGUF file of {base}, not taken from "
                "its original floating-point release: they carry that quantization's error, and so does this "
                "model.", ""]
    if facts.forced:
        out += [f"> **Warning:** this model was published with `--force` although {_skipped(ev)}. Check the "
                "results below before relying on it.", ""]

    out += ["## Method", "", f"- Method: {method_name} (`{method}`)" if method else "- Method: not recorded"]
    if factor:
        out.append(f"- Scale factor: {factor:g}")
    if orig:
        out.append(f"- Original context: {orig:,} tokens")
    if ctx:
        out.append(f"- Extended context: {ctx:,} tokens")
    scaling = cfg.get("rope_scaling")
    out.append(f"- `rope_scaling` in config.json: `{json.dumps(scaling)}`" if scaling
               else f"- `rope_theta` in config.json: {cfg.get('rope_theta')} (no `rope_scaling`)")
    out.append("")

    if calib:
        out += ["## Calibration", ""]
        recipe = calib.get("recipe") if isinstance(calib.get("recipe"), dict) else {}
        hyper = recipe.get("hyperparameters") or recipe.get("training") or _recipe_hyperparameters(recipe, calib)
        out.append(f"- Recipe: `{recipe.get('name') or method}`")
        for key, label in (("steps", "Steps"), ("tokens", "Training tokens"), ("train_len", "Sequence length"),
                           ("seed", "Seed"), ("final_loss", "Final loss")):
            if calib.get(key) is not None:
                value = calib[key]
                out.append(f"- {label}: {value:,}" if isinstance(value, int) else f"- {label}: {value}")
        if hyper:
            out += ["", "| hyperparameter | value |", "|---|---|"]
            out += [f"| {k} | {_cell(v)} |" for k, v in hyper.items()]
        data = calib.get("data") or {}
        if data:
            out += ["", "Data:", ""]
            sources = data.get("sources") or []
            out.append(f"- Sources: {', '.join(f'`{s}`' for s in sources) if sources else 'not recorded'}")
            for key, label in (("documents", "Documents"), ("tokens", "Tokens"), ("fingerprint", "Fingerprint")):
                if data.get(key) is not None:
                    value = data[key]
                    out.append(f"- {label}: {value:,}" if isinstance(value, int) else f"- {label}: `{value}`")
        out.append("")

    out += ["## Evaluation", ""]
    results = ev.get("results") or []
    if results:
        baseline = _baseline_ppl(ev.get("baseline"))
        head = "| context | perplexity |" + (" base perplexity |" if baseline else "") + " tokens | documents | stride |"
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in results:
            row = f"| {r.get('ctx')} | {_num(r.get('ppl'))} |"
            if baseline:
                row += f" {_num(baseline.get(r.get('ctx')))} |"
            row += f" {_cell(r.get('tokens'))} | {_cell(r.get('documents'))} | {_cell(r.get('stride'))} |"
            out.append(row)
        out.append("")
    passkey = ev.get("passkey") or {}
    if passkey:
        out.append(f"Passkey retrieval: effective context k_max = {_cell(passkey.get('k_max'))} tokens.")
        acc = passkey.get("accuracy_by_distance") or {}
        if acc:
            out.append("Accuracy by distance: " + ", ".join(f"{d}: {_num(a)}" for d, a in acc.items()) + ".")
        out.append("")
    out += _task_table(ev.get("tasks"), (ev.get("baseline") or {}).get("tasks")
                       if isinstance(ev.get("baseline"), dict) else None)
    gate = ev.get("gate")
    if gate:
        out.append(f"Gate: **{'passed' if gate.get('passed') else 'failed'}**"
                   + (f" ({'; '.join(gate.get('reasons'))})" if gate.get("reasons") else "") + ".")
        if gate.get("thresholds"):
            out.append(f"Thresholds: `{json.dumps(gate['thresholds'])}`.")
        out.append("")
    elif not results:
        out += ["No evaluation was recorded for this model.", ""]
    if facts.plot:
        out += [f"![Perplexity against context length]({facts.plot})", ""]

    out += ["## Files", "", "| file | size |", "|---|---|"]
    out += [f"| `{path}` | {human_bytes(size)} |" for path, size in facts.files]
    out.append("")

    out += quant_ladder_section(facts.quant_quality)
    out += ["## Usage", "", "### transformers", "", "The scaling is in config.json; no custom code is needed.",
            "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{facts.repo_id}")',
            f'model = AutoModelForCausalLM.from_pretrained("{facts.repo_id}", dtype="auto")', "```", ""]
    if facts.gguf_files:
        gguf = facts.gguf_files[0]
        # llama-completion: one prompt, then exit (llama-cli is the interactive chat); llama-server: an API.
        out += ["### llama.cpp", "", "```bash", f"hf download {facts.repo_id} {gguf} --local-dir .",
                f"llama-completion -m {gguf} -c {ctx or 0} -n 64 -p \"Once upon a time\"",
                f"llama-server -m {gguf} -c {ctx or 0}", "```", ""]
    if facts.trtllm_build:
        out += ["### TensorRT-LLM", "", "```bash", f"hf download {facts.repo_id} --include 'trtllm/*' --local-dir .",
                facts.trtllm_build, "```", ""]
    out += _adapter_usage(facts)
    if facts.reproduce:
        out += ["## Reproduce", "", "```bash", facts.reproduce, "```", ""]
    out += ["## License", ""]
    out.append(f"`{facts.license}`, inherited from the base model {base}." if facts.license
               else f"Inherited from the base model {base}; see its card.")
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The GGUF quant ladder (pizoo.export.quantize, measured by pizoo.eval.llamacpp)

# The recommendation: the smallest file whose mean KL divergence from the f16/bf16 file stays at or
# below this (llama.cpp's users read ~0.05 as "close to the original" for a 4-5 bit quant of a 7B).
RECOMMEND_MAX_KLD = 0.05


def quant_ladder_section(rows: list[dict] | None) -> list[str]:
    """'## GGUF quants': file, size, bits per weight, ppl at the measured context, KLD and top-1
    agreement against the f16/bf16 file, all measured in llama.cpp; then one recommendation line."""
    if not rows:
        return []
    ctx = max(int(r["ctx"]) for r in rows)
    ref = next((r.get("reference") for r in rows if r.get("reference")), None)
    out = ["## GGUF quants", "",
           f"Measured in llama.cpp (llama-cpp-python) at {ctx:,} tokens of context on held-out text: perplexity, "
           f"and against {f'`{ref}`' if ref else 'the f16 file'} the mean KL divergence of the next-token "
           "distributions and how often both pick the same top token.", "",
           f"| file | size | bits/weight | ppl @ {context_label(ctx)} | KLD | top-1 |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -int(r["bytes"])):
        kld = f"{r['kld']:.4f}" if r.get("kld") is not None else "-"
        top1 = f"{100 * r['top1']:.1f}%" if r.get("top1") is not None else "-"
        out.append(f"| `{r['file']}` | {human_bytes(int(r['bytes']))} | {float(r['bpw']):.2f} | {float(r['ppl']):.4g} | "
                   f"{kld} | {top1} |")
    quants = [r for r in rows if r.get("kld") is not None and r.get("file") != ref]
    fit = [r for r in quants if r["kld"] <= RECOMMEND_MAX_KLD]
    out.append("")
    if fit:
        best = min(fit, key=lambda r: int(r["bytes"]))
        out.append(f"Recommendation: `{best['file']}`, the smallest file with mean KLD <= {RECOMMEND_MAX_KLD} "
                   f"({best['kld']:.4f}, top-1 {100 * best['top1']:.1f}%) at {ctx:,} tokens.")
    elif quants:
        out.append(f"Recommendation: no quant stays within mean KLD {RECOMMEND_MAX_KLD} at {ctx:,} tokens; use the "
                   "largest file that fits your memory, or the f16 file.")
    out.append("")
    return out


# calibration.json's recipe is pizoo.recipes.Recipe.to_dict(): the training keys are at its top level.
_RECIPE_TRAIN_KEYS = ("betas", "weight_decay", "warmup_steps", "warmup_ratio", "warmup_start", "schedule",
                      "min_lr_ratio", "positions")


def _adapter_usage(facts: CardFacts) -> list[str]:
    """The PEFT adapter of a LoRA(+) calibration (adapter/ in the repo), when one was uploaded."""
    lora = (facts.calibration or {}).get("lora")
    if not isinstance(lora, dict) or not any(p == "adapter/adapter_config.json" for p, _ in facts.files):
        return []
    base = hub_base_id_of(facts.config, facts.calibration) or "BASE_MODEL"
    extra = f" + trainable {', '.join(lora.get('trainable') or [])}" if lora.get("trainable") else ""
    return ["### PEFT adapter", "",
            f"Calibrated with {lora.get('kind', 'LoRA')} (rank {lora.get('rank')}, alpha {_num(lora.get('alpha'))} on "
            f"{','.join(lora.get('targets') or []) or 'the attention projections'}{extra}). The weights above are merged; `adapter/` holds the same "
            "result as a PEFT adapter for the base. Load the base with this repo's config.json, which holds the RoPE "
            "scaling the adapter was trained for:", "",
            "```python", "from peft import PeftModel", "from transformers import AutoConfig, AutoModelForCausalLM", "",
            f'config = AutoConfig.from_pretrained("{facts.repo_id}")',
            f'base = AutoModelForCausalLM.from_pretrained("{base}", config=config, torch_dtype="auto")',
            f'model = PeftModel.from_pretrained(base, "{facts.repo_id}", subfolder="adapter")', "```", ""]


def _recipe_hyperparameters(recipe: dict, calib: dict) -> dict:
    """The fine-tune's hyperparameters as calibrate ran them: the peak lr and global batch actually used
    (calibration.json), the recipe's optimizer and schedule, and its RoPE parameters."""
    hyper: dict[str, Any] = {}
    if recipe.get("train") is False or calib.get("steps") == 0:
        return hyper  # no fine-tune ran (dynamic NTK)
    if calib.get("lr") is not None:
        hyper["lr"] = calib["lr"]
    for key in _RECIPE_TRAIN_KEYS:
        if key == "warmup_steps" and recipe.get("warmup_ratio") is not None:
            continue  # warmup_ratio replaces warmup_steps
        if recipe.get(key) is not None:
            hyper[key] = recipe[key]
    if calib.get("global_batch") is not None:
        hyper["global_batch"] = calib["global_batch"]
    for key, value in (recipe.get("rope") or {}).items():
        hyper[f"rope.{key}"] = value
    return hyper


def failing_reasons(gate: dict) -> list[str]:
    """Why a gate failed: eval.json lists every check ("pass: ...", "FAIL: ..."); keep the failures."""
    reasons = [str(r) for r in gate.get("reasons") or []]
    failed = [r.removeprefix("FAIL: ") for r in reasons if r.startswith("FAIL")]
    return failed or reasons


def _task_table(tasks: dict | None, base: dict | None) -> list[str]:
    """Long-context task scores per length (the base's in parentheses) and the effective length."""
    if not tasks or not tasks.get("tasks"):
        return []
    lengths = [str(x) for x in tasks.get("lengths") or []]
    out = ["Long-context tasks (RULER-style, string-match recall, "
           f"{_cell(tasks.get('samples'))} samples per task and length"
           + ("; the base model's score in parentheses" if base else "") + "):", "",
           "| task | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
    rows = list(tasks["tasks"].items()) + [("mean", {"scores": tasks.get("average") or {}})]
    for name, entry in rows:
        theirs = ((base or {}).get("tasks") or {}).get(name, {}).get("scores") if name != "mean" \
            else (base or {}).get("average")
        cells = []
        for length in lengths:
            cell = _num((entry.get("scores") or {}).get(length))
            if theirs and length in theirs:
                cell += f" ({_num(theirs[length])})"
            cells.append(cell)
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    eff = tasks.get("effective_length")
    shown = f"{_cell(eff)} tokens" if eff is not None else "not measured (no length at which every task ran)"
    out += ["", f"Effective length: {shown} (the longest length whose mean "
            f"score stays at or above {_cell(tasks.get('threshold'))}, RULER's threshold)"
            + (f"; the base's: {_cell(base.get('effective_length'))}." if base else "."), ""]
    return out


def _baseline_ppl(baseline: Any) -> dict:
    """{ctx: ppl} from eval.json's `baseline` (a results list, or an object holding one)."""
    if isinstance(baseline, dict):
        baseline = baseline.get("results")
    if not isinstance(baseline, list):
        return {}
    return {r.get("ctx"): r.get("ppl") for r in baseline if isinstance(r, dict)}


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _cell(v)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (dict, list)):
        return f"`{json.dumps(v)}`"
    return str(v)


def read_card_license(readme: Path) -> str | None:
    """The `license:` of a model card's YAML front matter, if the file has one."""
    return card_license(readme)
