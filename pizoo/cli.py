"""The `pizoo` command line: parses arguments, calls library functions, reports.

The work lives in library modules (callable from Python); this file only translates between the
terminal and them. Every user-fixable problem is a PizooError: one line on stderr, exit code 2
(3 for a failed evaluation gate), never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import importlib

import typer
from typer.core import TyperGroup

from . import __version__
from .errors import PizooError

PIPELINE = "Pipeline"
STEPS = "Pipeline steps"
MODELS = "Models and checkpoints"
HUB = "Hub and zoo"
# click's exceptions, or the copy of click that typer vendors (typer >= 0.29): where BadParameter lives.
_usage = importlib.import_module(typer.BadParameter.__module__)


class OneLineUsageErrors(TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type, a missing argument) end like every
    other bad input: one `error:` line naming the option and where help is, exit 2, instead of
    click's boxed usage text. Help itself (no arguments, --help) is printed as before."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except getattr(_usage, "NoArgsIsHelpError", ()) as e:
            if not standalone_mode:
                raise
            e.show()
            sys.exit(e.exit_code)
        except _usage.ClickException as e:
            if not standalone_mode:
                raise
            where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "pizoo"
            err(f"{e.format_message().rstrip('.')}; see `{where} --help`")
            sys.exit(e.exit_code)
        except typer.Abort:  # Ctrl-C while the arguments were read
            if not standalone_mode:
                raise
            err("interrupted")
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)  # typer.Exit(code) comes back as its code


app = typer.Typer(
    name="pizoo",
    cls=OneLineUsageErrors,
    help="Extend the context window of RoPE language models and ship them: HF, GGUF, TensorRT-LLM, the Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def reports_errors(fn: Callable) -> Callable:
    """Turn PizooError (and Ctrl-C) into a one-line message and the error's exit code. An OSError
    that escaped the library's own handling (fsutil.writing) still ends in one line naming the path."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .fsutil import os_error_of, write_error

        try:
            return fn(*args, **kwargs)
        except PizooError as e:
            err(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:
            oe = os_error_of(e)
            if oe is None:
                raise
            err(str(write_error(oe.filename or "a file", oe, verb="failed")))
            raise typer.Exit(PizooError.exit_code) from None

    return wrapper


def command(name: str, panel: str, sub: typer.Typer | None = None, **kw: Any) -> Callable:
    """Register a command in a help panel, with pizoo's error reporting."""
    target = sub or app

    def deco(fn: Callable) -> Callable:
        return target.command(name, rich_help_panel=panel, **kw)(reports_errors(fn))

    return deco


DATA_HELP = ("Text: .txt, .md, .jsonl, .parquet (.txt/.jsonl also .gz or .zst), folders, globs or a Hub dataset "
             "id; repeatable. Default: the offline corpus.")


def text_field_option() -> Any:
    return typer.Option("text", "--text-field", help="The JSON-lines field or Parquet column that holds the text.")


def data_revision_option() -> Any:
    return typer.Option(None, "--data-revision", help="Hub dataset revision (branch, tag or commit; default main, "
                        "then its refs/convert/parquet branch).")


def data_files_option() -> Any:
    return typer.Option(None, "--data-files", help="Glob of Hub dataset files to use (e.g. 'default/train/*.parquet').")


def min_doc_tokens_option() -> Any:
    return typer.Option(0, "--min-doc-tokens", help="Drop calibration documents with fewer tokens than this.")


def upsample_long_option() -> Any:
    return typer.Option(1, "--upsample-long", help="Repeat documents longer than the training length this many "
                        "times (in a seeded order); 1: no upsampling.")


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pizoo {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """pizoo: context extension for RoPE language models."""


# ------------------------------------------------------------------------------------------------
# LoRA options (shared by extend and calibrate)

LORA_OPTION = typer.Option(None, "--lora", help="Train rank-RANK LoRA adapters instead of every weight (LongLoRA+: "
                           "embeddings and norms train too); the output is merged, the adapter written beside it.",
                           metavar="RANK")
LORA_ALPHA_OPTION = typer.Option(None, "--lora-alpha", help="LoRA scale numerator: updates are alpha/rank x B A "
                                 "(default: 2 x rank).")
LORA_TARGETS_OPTION = typer.Option(None, "--lora-targets", help="Projections to adapt, by name without "
                                   "_proj: e.g. q,k,v,o,gate,up,down for Llama-like models, or all (default: the "
                                   "attention projections).")
LORA_TRAINABLE_OPTION = typer.Option(None, "--lora-trainable", help="Also train in full: a subset of embed,norm,head, "
                                     "or none for plain LoRA (default: embed,norm, LongLoRA+).")
OFFLOAD_OPTION = typer.Option(False, "--offload", help="Keep parameters, gradients and AdamW state in host memory "
                              "(FSDP2's CPU offload) for a fine-tune too big for the GPUs; same result, slower steps.")


# ------------------------------------------------------------------------------------------------
# The whole pipeline


@command("extend", PIPELINE)
def extend_cmd(
    model: str = typer.Argument(..., help="HF folder, .gguf file, zoo name or alias (smollm2-135m, llama-2-7b, ...) "
                                "or Hub id."),
    ctx: int = typer.Option(..., "--ctx", help="Target context length in tokens (e.g. 32768)."),
    recipe: str = typer.Option("pi", "--recipe", help="Recipe name (pizoo recipes list) or a .toml file."),
    data: Optional[list[str]] = typer.Option(None, "--data", help="Calibration/evaluation text. " + DATA_HELP),
    text_field: str = text_field_option(),
    data_revision: Optional[str] = data_revision_option(),
    data_files: Optional[str] = data_files_option(),
    min_doc_tokens: int = min_doc_tokens_option(),
    upsample_long: int = upsample_long_option(),
    steps: Optional[int] = typer.Option(None, "--steps", help="Calibration steps (default: the recipe's)."),
    train_len: Optional[int] = typer.Option(None, "--train-len", help="Calibration sequence length (default: --ctx); "
                                            "shorter sequences spread their positions over the target."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Sequences per optimizer step "
                                               "(default: the recipe's)."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Formats to write: a subset of hf,gguf,trtllm "
                                          "(hf is always written: the others are made from it). Default: every "
                                          "format the model's family can be written as."),
    gguf_dtype: str = typer.Option("f16", "--gguf-dtype", help="GGUF type(s), comma-separated: f32, f16, bf16, "
                                   "q8_0, or a ladder such as f16,q8_0,q6_k,q5_k_m,q4_k_m,iq4_xs (quants by "
                                   "llama.cpp's quantizer: pip install 'pizoo[quant]')."),
    tp: int = typer.Option(1, "--tp", help="TensorRT-LLM tensor-parallel size (1, 2, 4, 8)."),
    eval_mode: str = typer.Option("full", "--eval", help="full: perplexity and passkey up to the target with the "
                                  "gate (needs a GPU for long targets); quick: a short ungated check a CPU finishes "
                                  "in minutes."),
    eval_ctx: Optional[str] = typer.Option(None, "--eval-ctx", help="Context lengths to evaluate, comma-separated "
                                           "(default: the --eval mode's)."),
    push: Optional[str] = typer.Option(None, "--push", help="Publish to this Hub repo (NAMESPACE/NAME) if the gate "
                                       "passes."),
    out: Optional[Path] = typer.Option(None, "--out", help="Release folder (default: ./MODEL-32k)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit; touch nothing."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Skip finished stages whose inputs are unchanged "
                                "and whose outputs verify (default), or start over."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Calibration steps between training "
                                         "checkpoints."),
    seed: int = typer.Option(0, "--seed", help="Seed for data order, positions and passkeys."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="With --dry-run: plan for other hardware "
                                           "(h100, h100x8, a100x16, cpu); WORLD_SIZE is read otherwise."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable plan (--dry-run) or summary on "
                                 "stdout; progress goes to stderr."),
    lora: Optional[int] = LORA_OPTION,
    lora_alpha: Optional[float] = LORA_ALPHA_OPTION,
    lora_targets: Optional[str] = LORA_TARGETS_OPTION,
    lora_trainable: Optional[str] = LORA_TRAINABLE_OPTION,
    offload: bool = OFFLOAD_OPTION,
) -> None:
    """Plan, calibrate, evaluate and gate, convert (HF, GGUF, TensorRT-LLM), register and push: resumable."""
    from .eval import parse_contexts
    from .lora import lora_settings
    from .pipeline import ExtendOptions, extend, parse_formats, plan_extend, render_summary
    from .plan import render_plan

    from .data import cli_data_spec

    cli_data_spec(data, text_field, data_revision, data_files)  # checks the data options before any work
    opts = ExtendOptions(model=model, ctx=ctx, recipe=recipe, data=data or None, steps=steps, train_len=train_len,
                         text_field=text_field, data_revision=data_revision, data_files=data_files,
                         min_doc_tokens=min_doc_tokens, upsample_long=upsample_long,
                         formats=parse_formats(formats) if formats is not None else None, gguf_dtype=gguf_dtype, tp=tp, push=push, out=out,
                         resume=resume, seed=seed, global_batch=global_batch, checkpoint_every=checkpoint_every,
                         eval=eval_mode, eval_ctx=parse_contexts(eval_ctx, "--eval-ctx"), hardware=hardware,
                         progress=sys.stderr.isatty(),
                         lora=lora_settings(lora, alpha=lora_alpha, targets=lora_targets, trainable=lora_trainable),
                         offload=offload)
    if dry_run:
        plan = plan_extend(opts)
        if as_json:
            print_json(plan.to_dict())
        else:
            typer.echo(render_plan(plan))
        if not plan.fits:
            from .plan import refuse_if_unfit

            refuse_if_unfit(plan)
        return
    summary = extend(opts)
    if summary.get("worker"):  # a torchrun rank other than 0: it only joined the calibration
        return
    if as_json:
        print_json(summary)
    else:
        typer.echo(render_summary(summary))


# ------------------------------------------------------------------------------------------------
# Calibration and recipes


@command("calibrate", STEPS)
def calibrate_cmd(
    model: str = typer.Argument(..., help="Base model: HF folder, .gguf file, zoo name or Hub id."),
    ctx: int = typer.Option(..., "--ctx", help="Target context length in tokens (must exceed the original)."),
    recipe: str = typer.Option("pi", "--recipe", help="Recipe name (pizoo recipes list) or a .toml file."),
    data: Optional[list[str]] = typer.Option(None, "--data", help="Training text. " + DATA_HELP),
    text_field: str = text_field_option(),
    data_revision: Optional[str] = data_revision_option(),
    data_files: Optional[str] = data_files_option(),
    min_doc_tokens: int = min_doc_tokens_option(),
    upsample_long: int = upsample_long_option(),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default: the recipe's)."),
    train_len: Optional[int] = typer.Option(None, "--train-len", help="Sequence length to train on (default: --ctx); "
                                            "shorter spreads position ids over the target range."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output HF folder (default: <model>-<ctx>-<recipe>)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint of this --out."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Sequences per optimizer step "
                                               "(default: the recipe's)."),
    micro_batch: int = typer.Option(1, "--micro-batch", help="Sequences per forward/backward on each process."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the recipe's, by model size)."),
    seed: int = typer.Option(0, "--seed", help="Seed for data order and position sampling."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Save the training state every N steps."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing",
                                                  help="Recompute layer activations in backward (less memory)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    lora: Optional[int] = LORA_OPTION,
    lora_alpha: Optional[float] = LORA_ALPHA_OPTION,
    lora_targets: Optional[str] = LORA_TARGETS_OPTION,
    lora_trainable: Optional[str] = LORA_TRAINABLE_OPTION,
    offload: bool = OFFLOAD_OPTION,
) -> None:
    """Calibration fine-tune: teach a model a longer context with a recipe (PI, NTK, YaRN, Llama 3, CLEX)."""
    from .data import cli_data_spec
    from .lora import lora_settings
    from .options import check_context, check_device
    from .train import calibrate, default_output_dir

    check_context(ctx)
    check_device(device)
    spec = cli_data_spec(data, text_field, data_revision, data_files)
    settings = lora_settings(lora, alpha=lora_alpha, targets=lora_targets, trainable=lora_trainable)
    out = out or default_output_dir(model, ctx, recipe)
    result = calibrate(model, out, ctx=ctx, recipe=recipe, data=spec, steps=steps, train_len=train_len,
                       min_doc_tokens=min_doc_tokens, upsample_long=upsample_long,
                       seed=seed, resume=resume, checkpoint_every=checkpoint_every, device=device,
                       activation_checkpointing=activation_checkpointing, global_batch=global_batch,
                       micro_batch=micro_batch, lr=lr, overwrite=overwrite, lora=settings, offload=offload,
                       log=lambda msg: typer.echo(msg, err=True))
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    typer.echo(f"wrote {result.out} ({result.method} x{result.factor:g} -> {result.ctx} tokens, "
               f"{result.steps} steps{loss})")


recipes_app = typer.Typer(help="Calibration recipes: RoPE method, training hyperparameters, gate thresholds.",
                          no_args_is_help=True)
app.add_typer(recipes_app, name="recipes", rich_help_panel=STEPS)


@command("list", STEPS, sub=recipes_app)
def recipes_list_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the built-in recipes."""
    from .recipes import list_recipes, load_recipe

    rows = [load_recipe(name) for name in list_recipes()]
    if as_json:
        print_json([{"name": r.name, "method": r.method, "steps": r.steps, "description": r.description,
                     "path": r.path} for r in rows])
        return
    width = max((len(r.name) for r in rows), default=4)
    for r in rows:
        typer.echo(f"{r.name:<{width}}  {r.method:<8} {r.steps:>5} steps  {r.description}")


@command("show", STEPS, sub=recipes_app)
def recipes_show_cmd(
    name: str = typer.Argument(..., help="Recipe name or path of a .toml file."),
    as_json: bool = typer.Option(False, "--json", help="The validated recipe as JSON."),
) -> None:
    """Show a recipe (validated); prints the TOML source, or JSON with --json."""
    from .recipes import load_recipe

    r = load_recipe(name)
    if as_json:
        print_json(r.to_dict())
    else:
        typer.echo(f"# {r.path}")
        typer.echo(Path(r.path).read_text(encoding="utf-8").rstrip())


# ------------------------------------------------------------------------------------------------
# Evaluation and the gate


@command("eval", STEPS)
def eval_cmd(
    model: str = typer.Argument(..., help="HF folder, .gguf file, zoo name or Hub id."),
    ctx: Optional[str] = typer.Option(None, "--ctx", help="Context lengths, comma-separated (e.g. 2048,4096,8k). "
                                      "Default: the original context, its doublings and the target."),
    data: Optional[list[str]] = typer.Option(None, "--data", help="Text to score. " + DATA_HELP),
    text_field: str = text_field_option(),
    data_revision: Optional[str] = data_revision_option(),
    data_files: Optional[str] = data_files_option(),
    split: Optional[str] = typer.Option(None, "--split", help="Which documents: heldout (never trained on), train "
                                        "or all. Default: heldout for the default corpus and the model's own "
                                        "calibration data (calibration.json), all for other --data."),
    stride: int = typer.Option(256, "--stride", help="Window step (PI/YaRN: 256); --stride equal to the window "
                               "is the disjoint mode."),
    passkey: bool = typer.Option(True, "--passkey/--no-passkey", help="Run passkey retrieval (the paper's prompt)."),
    passkey_mode: str = typer.Option("greedy", "--passkey-mode", help="greedy (the key is what greedy decoding "
                                     "emits, checked in one pass), generate (real decoding with the KV cache) "
                                     "or loglik (mean exact-match likelihood of the key)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Long-context tasks at every --ctx, comma-separated: "
                                        "passkey, niah (8 needle tasks), vt, cwe, fwe, single names like "
                                        "niah_single_1, or ruler (all but passkey). Default: none."),
    samples: int = typer.Option(5, "--samples", help="Samples per task and length."),
    passkey_trials: int = typer.Option(10, "--passkey-trials", help="Random 5-digit keys per distance."),
    passkey_distances: int = typer.Option(32, "--passkey-distances", help="Distances spread over the window."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Base model to compare with, measured at its "
                                           "original context (default: the base recorded with a calibrated model)."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Measure no baseline (skips the ppl checks)."),
    baseline_ctx: str = typer.Option("original", "--baseline-ctx", help="original: the base at its original "
                                     "context and shorter ones; all: at every --ctx too (extrapolation); listed: only at the --ctx "
                                     "within its original context (no gate)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Take the gate thresholds from this recipe."),
    max_ppl_ratio_target: Optional[float] = typer.Option(None, "--max-ppl-ratio-target",
                                                         help="Gate: ppl at the target / base ppl (default 1.10)."),
    max_ppl_ratio_original: Optional[float] = typer.Option(None, "--max-ppl-ratio-original",
                                                           help="Gate: ppl at the original context / the base's "
                                                           "(default 1.05)."),
    min_passkey_accuracy: Optional[float] = typer.Option(None, "--min-passkey-accuracy",
                                                         help="Gate: passkey accuracy, averaged over the distances "
                                                         "up to the target, half of it at each (default 0.9)."),
    no_gate: bool = typer.Option(False, "--no-gate", help="Measure only; apply no gate (exit 0)."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="Score at most this many documents (reading stops there)."),
    doc_tokens: Optional[int] = typer.Option(None, "--doc-tokens", help="Tokens scored per document (default: "
                                             "the longest --ctx; with one --ctx, whole documents)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the passkeys."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32|bfloat16|float16 (default: bf16 on GPU, "
                                        "fp32 on CPU)."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Tokens per forward pass "
                                               "(default: 16384 on CPU, from free memory on GPU)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Measure again even when results are cached."),
    full_hash: bool = typer.Option(False, "--full-hash", help="Identify the model by a hash of every weight byte "
                                   "(default: sizes, times, headers and samples)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eval.json and ppl.png "
                                       "(default: pizoo-eval/<model name>)."),
    as_json: bool = typer.Option(False, "--json", help="Print eval.json instead of the table."),
    backend: str = typer.Option("pizoo", "--backend", help="pizoo: import to torch (every measurement, the gate); "
                                "llama.cpp: run a .gguf in llama.cpp (perplexity, and KL divergence and top-1 "
                                "agreement with --reference; needs pip install 'pizoo[quant]')."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="llama.cpp backend: the f16/bf16 .gguf "
                                             "the file's token distributions are compared with."),
) -> None:
    """Perplexity, passkey retrieval, long-context tasks and the publish gate (exit 3 when it fails)."""
    from .data import cli_data_spec
    from .eval import evaluate_model, format_report, raise_if_failed
    from .fsutil import output_lock
    from .options import check_device
    from .recipes import GateThresholds

    spec = cli_data_spec(data, text_field, data_revision, data_files)

    if backend == "llama.cpp":
        from .eval.llamacpp import run_eval_command

        run_eval_command(Path(model), ctx=ctx, reference=reference, data=spec,
                         split=split or ("heldout" if spec is None else "all"),
                         max_documents=max_docs, doc_tokens=doc_tokens, out=out, as_json=as_json,
                         echo=lambda msg: typer.echo(msg, err=True), emit=typer.echo)
        return
    if backend != "pizoo":
        raise PizooError(f"--backend {backend}: use pizoo or llama.cpp")
    if reference is not None:
        raise PizooError("--reference: only with --backend llama.cpp (the KL divergence of a GGUF)")

    if baseline and no_baseline:
        raise PizooError("--baseline and --no-baseline: give one or the other")
    thresholds = GateThresholds()
    if recipe is not None:
        from .recipes import load_recipe

        thresholds = load_recipe(recipe).gate
    for name, value in (("max_ppl_ratio_target", max_ppl_ratio_target),
                        ("max_ppl_ratio_original", max_ppl_ratio_original),
                        ("min_passkey_accuracy", min_passkey_accuracy)):
        if value is not None:
            setattr(thresholds, name, value)
    out = out or Path("pizoo-eval") / Path(model.rstrip("/")).name.removesuffix(".gguf")
    with output_lock(out):
        report = evaluate_model(model, ctx=ctx, data=spec, split=split, stride=stride, passkey=passkey,
                                baseline=False if no_baseline else baseline, gate=False if no_gate else thresholds,
                                out=out, passkey_mode=passkey_mode, passkey_trials=passkey_trials,
                                passkey_distances=passkey_distances, seed=seed, max_documents=max_docs,
                                doc_tokens=doc_tokens, baseline_ctx=baseline_ctx, device=check_device(device),
                                dtype=dtype, batch_tokens=batch_tokens, cache=not no_cache, full_hash=full_hash,
                                tasks=tasks, task_samples=samples, echo=lambda msg: typer.echo(msg, err=True))
    if as_json:
        print_json(report)
    else:
        typer.echo(format_report(report))
        typer.echo(f"\nwrote {out / 'eval.json'}" + (f" and {out / report['plot']}" if report["plot"] else ""))
    raise_if_failed(report, out)


@command("convert", STEPS)
def convert_cmd(
    model: str = typer.Argument(..., help="HF folder, .gguf file, zoo name or Hub id."),
    to: str = typer.Option(..., "--to", help="Target format: gguf or trtllm."),
    dtype: Optional[str] = typer.Option(None, "--dtype", "--gguf-dtype",
                                        help="gguf: f32|f16|bf16|q8_0 (default f16), or a comma-separated ladder "
                                        "such as f16,q8_0,q6_k,q5_k_m,q4_k_m,iq4_xs (the quants made from the "
                                        "f16/bf16 file by llama.cpp's quantizer: pip install 'pizoo[quant]'). "
                                        "trtllm: float16|bfloat16|float32 (default float16)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (gguf; a folder for several types) or "
                                       "folder (trtllm)."),
    pre: Optional[str] = typer.Option(None, "--pre", help="gguf: tokenizer.ggml.pre name for an unrecognised BPE tokenizer."),
    static_length: Optional[int] = typer.Option(None, "--static-length",
                                                help="gguf: bake dynamic NTK into a static scaling at this length."),
    tp: int = typer.Option(1, "--tp", help="trtllm: tensor-parallel size (1, 2, 4, 8)."),
    pp: int = typer.Option(1, "--pp", help="trtllm: pipeline-parallel size (1, 2, 4)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Convert a model to GGUF (llama.cpp) or a TensorRT-LLM checkpoint, with the RoPE scaling inside."""
    from .resolve import pizoo_home, resolve_model

    resolved = resolve_model(model)
    src = resolved.path
    # A .gguf import, a Hub download or a pulled zoo entry lives in pizoo's cache: the default output
    # goes to the current folder, named after what the user gave, not into the cache.
    cached = resolved.source in ("gguf", "hub") or pizoo_home().resolve() in src.resolve().parents
    label = resolved.gguf_file.stem if resolved.gguf_file else resolved.spec.rstrip("/").split("/")[-1]
    if to == "gguf":
        from .export.gguf import export_gguf
        from .export.quantize import DIRECT_TYPES, parse_gguf_types, write_ladder

        types = parse_gguf_types(dtype or "f16", "--dtype")
        target = out if out is not None or not cached else Path.cwd()
        if len(types) == 1 and types[0] in DIRECT_TYPES:
            result = export_gguf(src, target, dtype=types[0], pre=pre, static_length=static_length,
                                 overwrite=overwrite, progress=True)
            typer.echo(f"wrote {result}")
        else:
            files = write_ladder(src, target if target is not None else src.resolve().parent, types, pre=pre,
                                 static_length=static_length, overwrite=overwrite, progress=True,
                                 say=lambda msg: typer.echo(msg, err=True))
            for f in files:
                typer.echo(f"wrote {f.path}")
    elif to == "trtllm":
        from .export.trtllm import default_output, export_trtllm, trtllm_build_command

        if out is None and cached:
            out = default_output(Path(label), dtype or "float16", tp, pp)
        result = export_trtllm(src, out, dtype=dtype or "float16", tp=tp, pp=pp, overwrite=overwrite, progress=True)
        typer.echo(f"wrote {result}")
        typer.echo(f"build the engine with:\n  {trtllm_build_command(result)}")
    else:
        raise PizooError(f"--to: unknown format '{to}'; use gguf or trtllm")


# ------------------------------------------------------------------------------------------------
# Models and checkpoints


@command("inspect", MODELS)
def inspect_cmd(
    path: Path = typer.Argument(..., help="HF folder, .gguf file or TensorRT-LLM checkpoint folder."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output with stable keys."),
) -> None:
    """Show a checkpoint's architecture, size, context length and RoPE scaling."""
    from .describe import inspect_path
    from .fsutil import human_bytes

    info = inspect_path(path)
    if as_json:
        print_json(info)
        return
    rope = info.get("rope") or {}
    rope_extra = {k: v for k, v in rope.items() if k not in ("type", "factor", "theta", "original_context")}
    lines = [
        ("format", info["format"]),
        ("architecture", info.get("architecture")),
        ("parameters", f"{info['params']:,}" if info.get("params") is not None else "?"),
        ("dtype", info.get("dtype")),
        ("context length", info.get("context_length")),
        ("original context", info.get("original_context_length")),
        ("rope", f"{rope.get('type')} (factor {rope.get('factor')}, theta {rope.get('theta')})"),
    ]
    for k, v in rope_extra.items():
        if isinstance(v, list):
            v = f"[{len(v)} values: {', '.join(f'{x:.3g}' for x in v[:4])}{', ...' if len(v) > 4 else ''}]"
        lines.append((f"  {k}", v))
    for key in ("tokenizer", "mapping", "tensor_types"):
        if key in info:
            lines.append((key, info[key]))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        typer.echo(f"{k:<{width}}  {v}")
    files = info.get("files") or {}
    if files:
        typer.echo(f"{'files':<{width}}  {len(files)} ({human_bytes(info.get('total_bytes', 0))})")
        for name, size in files.items():
            typer.echo(f"  {name}  {human_bytes(size)}")
    for w in info.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)


@command("import", MODELS)
def import_cmd(
    gguf_file: Path = typer.Argument(..., help="A .gguf file (llama.cpp architecture llama, qwen2, ...; see pizoo.families)."),
    out: Path = typer.Option(..., "--out", help="Output HF folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Import a GGUF file as an HF folder (weights dequantised, tokenizer and RoPE scaling read back)."""
    from .gguf_import import import_gguf

    result = import_gguf(gguf_file, out, overwrite=overwrite, progress=True)
    typer.echo(f"wrote {result}")


# ------------------------------------------------------------------------------------------------
# Hub and zoo


@command("push", HUB)
def push_cmd(
    folder: Path = typer.Argument(..., help="Release folder from `pizoo extend` (hf/, gguf/, trtllm/, eval/) "
                                  "or an HF model folder."),
    repo_id: str = typer.Argument(..., help="Hub repository, NAMESPACE/NAME (created when missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created from main if "
                                           "missing)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request against main instead."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List every file, its size and the card; contact no one."),
    force: bool = typer.Option(False, "--force", help="Publish even though the evaluation gate failed or never "
                               "ran (the card says so)."),
) -> None:
    """Publish a model to the Hugging Face Hub: every format and a model card, in one commit."""
    from .fsutil import human_bytes
    from .hub import push

    result = push(folder, repo_id, private=private, revision=revision, create_pr=create_pr, dry_run=dry_run,
                  force=force)
    width = max(len(f.path_in_repo) for f in result.files)
    if result.dry_run:
        where = f" (branch {revision})" if revision else " (pull request)" if create_pr else ""
        typer.echo(f"dry run: would push {len(result.files)} files ({human_bytes(result.total_bytes)}) to "
                   f"{repo_id}{where}; nothing was sent")
        for f in result.files:
            src = str(f.source) if f.source else "generated model card"
            typer.echo(f"  {f.path_in_repo:<{width}}  {human_bytes(f.size):>10}  {src}")
        typer.echo("--- README.md ---")
        typer.echo(result.card.rstrip())
        return
    if result.forced:
        typer.echo("warning: pushed with --force past a failed or missing evaluation gate; the card says so",
                   err=True)
    if result.unchanged:
        typer.echo(f"nothing to push: {result.url} already holds these {len(result.files)} files "
                   f"({human_bytes(result.total_bytes)})")
    else:
        typer.echo(f"pushed {len(result.files)} files ({human_bytes(result.total_bytes)}) to {result.url}")
    typer.echo(f"commit {result.commit}")
    if result.pr_url:
        typer.echo(f"pull request {result.pr_url}")
    typer.echo(f"zoo entry {result.zoo_entry}")


@command("pull", HUB)
def pull_cmd(
    model: str = typer.Argument(..., help="Hub id (NAMESPACE/NAME) or alias (pizoo zoo aliases)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
) -> None:
    """Download a model from the Hub into the zoo (resumable) and print its folder."""
    from .hub import pull

    typer.echo(str(pull(model, revision)))


zoo_app = typer.Typer(help="The local model zoo: bases and extended models, formats, checksums, lineage.",
                      no_args_is_help=True)
app.add_typer(zoo_app, name="zoo", rich_help_panel=HUB)


def _zoo_summary(entry: dict) -> dict:
    fmts = entry.get("formats", {})
    ev = entry.get("eval") or {}
    return {"name": entry["name"], "kind": entry.get("kind"), "source": entry.get("source"),
            "method": entry.get("method"), "context": entry.get("context"),
            "base": (entry.get("lineage") or {}).get("base_model"),
            "formats": sorted(k for k in fmts if k != "eval"),
            "bytes": sum(f.get("bytes", 0) for f in fmts.values()),
            "gate_passed": ev.get("gate_passed"),
            "published": [p.get("url") for p in entry.get("published", [])], "path": entry["path"]}


@command("list", HUB, sub=zoo_app)
def zoo_list_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the models in the zoo."""
    from .fsutil import human_bytes
    from .zoo import Zoo

    rows = [_zoo_summary(e) for e in Zoo().list()]
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("the zoo is empty (pizoo pull, pizoo extend or pizoo push add models)")
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        gate = {True: "gate passed", False: "gate FAILED", None: "no gate"}[r["gate_passed"]]
        typer.echo(f"{r['name']:<{width}}  {r['kind']:<8} {str(r['method'] or '-'):<8} "
                   f"{str(r['context'] or '-'):>7}  {','.join(r['formats']):<16} {human_bytes(r['bytes']):>10}  {gate}")


@command("show", HUB, sub=zoo_app)
def zoo_show_cmd(name: str = typer.Argument(..., help="Zoo entry name (pizoo zoo list).")) -> None:
    """Show an entry's full manifest (lineage, recipe, data, eval, formats with sha256) as JSON."""
    from .zoo import Zoo

    print_json(Zoo().get(name))


@command("verify", HUB, sub=zoo_app)
def zoo_verify_cmd(name: str = typer.Argument(..., help="Zoo entry name.")) -> None:
    """Re-hash every file of an entry; exit 1 and list the files that changed or went missing."""
    from .zoo import Zoo

    report = Zoo().verify(name)
    if report.ok:
        typer.echo(f"{name}: all {report.checked} files match their sha256")
        return
    for line in report.problems:
        typer.echo(line)
    err(f"{name}: {len(report.problems)} of {report.checked} files differ from the manifest; re-pull or "
        "re-export them, or `pizoo zoo rm` the entry")
    raise typer.Exit(1)


@command("rm", HUB, sub=zoo_app)
def zoo_rm_cmd(name: str = typer.Argument(..., help="Zoo entry name.")) -> None:
    """Remove an entry; files the zoo downloaded are deleted, folders elsewhere are left alone."""
    from .zoo import Zoo

    entry, deleted = Zoo().remove(name)
    typer.echo(f"removed {name}" + (f" and deleted {entry['path']}" if deleted else f" (kept {entry['path']})"))


@command("du", HUB, sub=zoo_app)
def zoo_du_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Disk usage per entry, and what the zoo folder itself holds."""
    from .fsutil import human_bytes
    from .zoo import Zoo

    usage = Zoo().disk_usage()
    if as_json:
        print_json(usage)
        return
    width = max([len(n) for n in usage["entries"]] + [5])
    for name, size in sorted(usage["entries"].items(), key=lambda kv: -kv[1]):
        typer.echo(f"{name:<{width}}  {human_bytes(size):>10}")
    typer.echo(f"{'total':<{width}}  {human_bytes(usage['entries_total']):>10}")
    typer.echo(f"zoo folder {usage['home']}: {human_bytes(usage['home_total'])} "
               f"(models {human_bytes(usage['home_on_disk']['models'])}, "
               f"partial downloads {human_bytes(usage['home_on_disk']['downloads'])})")


@command("alias", HUB, sub=zoo_app)
def zoo_alias_cmd(
    name: str = typer.Argument(..., help="Short name, e.g. my-base."),
    hub_id: str = typer.Argument(..., help="Hub id it stands for, NAMESPACE/NAME."),
    architecture: Optional[str] = typer.Option(None, "--architecture", help="The family's model_type: llama, mistral, qwen2, ..."),
    context: Optional[int] = typer.Option(None, "--context", help="The base's native context in tokens."),
    license: Optional[str] = typer.Option(None, "--license", help="The base's license id (inherited by cards)."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="A GGUF file on this machine made from HUB_ID: the "
                                        "alias resolves to it offline, with HUB_ID as the base's public identity."),
) -> None:
    """Add a user alias (it wins over a shipped one with the same name)."""
    from .zoo import Zoo

    Zoo().add_alias(name, hub_id, architecture=architecture, context=context, license=license, gguf=gguf)
    typer.echo(f"alias {name} -> {hub_id}" + (f" (the GGUF file {gguf})" if gguf else ""))


@command("aliases", HUB, sub=zoo_app)
def zoo_aliases_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the aliases: shipped ones for common bases, and the user's."""
    from .zoo import Zoo

    aliases = Zoo().aliases()
    if as_json:
        print_json(aliases)
        return
    width = max(len(n) for n in aliases)
    for name, a in sorted(aliases.items()):
        typer.echo(f"{name:<{width}}  {a['hub_id']:<52} {str(a.get('architecture') or '-'):<8} "
                   f"{str(a.get('context') or '-'):>7}  {a['origin']}")


def main() -> None:
    """Console-script entry point."""
    from .fsutil import install_fault_hook

    install_fault_hook()
    app()


if __name__ == "__main__":
    sys.exit(main())
