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

import typer

from . import __version__
from .errors import PizooError

PIPELINE = "Pipeline"
STEPS = "Pipeline steps"
MODELS = "Models and checkpoints"
HUB = "Hub and zoo"

app = typer.Typer(
    name="pizoo",
    help="Extend the context window of RoPE language models and ship them: HF, GGUF, TensorRT-LLM, the Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def reports_errors(fn: Callable) -> Callable:
    """Turn PizooError (and Ctrl-C) into a one-line message and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PizooError as e:
            err(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def command(name: str, panel: str, sub: typer.Typer | None = None, **kw: Any) -> Callable:
    """Register a command in a help panel, with pizoo's error reporting."""
    target = sub or app

    def deco(fn: Callable) -> Callable:
        return target.command(name, rich_help_panel=panel, **kw)(reports_errors(fn))

    return deco


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


@command("convert", STEPS)
def convert_cmd(
    model: str = typer.Argument(..., help="HF folder, .gguf file, zoo name or Hub id."),
    to: str = typer.Option(..., "--to", help="Target format: gguf or trtllm."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="gguf: f32|f16|bf16|q8_0 (default f16). "
                                        "trtllm: float16|bfloat16|float32 (default float16)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (gguf) or folder (trtllm)."),
    pre: Optional[str] = typer.Option(None, "--pre", help="gguf: tokenizer.ggml.pre name for an unrecognised BPE tokenizer."),
    static_length: Optional[int] = typer.Option(None, "--static-length",
                                                help="gguf: bake dynamic NTK into a static scaling at this length."),
    tp: int = typer.Option(1, "--tp", help="trtllm: tensor-parallel size (1, 2, 4, 8)."),
    pp: int = typer.Option(1, "--pp", help="trtllm: pipeline-parallel size (1, 2, 4)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Convert a model to GGUF (llama.cpp) or a TensorRT-LLM checkpoint, with the RoPE scaling inside."""
    from .resolve import resolve_model

    src = resolve_model(model).path
    if to == "gguf":
        from .export.gguf import export_gguf

        result = export_gguf(src, out, dtype=dtype or "f16", pre=pre, static_length=static_length,
                             overwrite=overwrite, progress=True)
        typer.echo(f"wrote {result}")
    elif to == "trtllm":
        from .export.trtllm import export_trtllm, trtllm_build_command

        result = export_trtllm(src, out, dtype=dtype or "float16", tp=tp, pp=pp, overwrite=overwrite, progress=True)
        typer.echo(f"wrote {result}")
        typer.echo(f"build the engine with:\n  {trtllm_build_command(result)}")
    else:
        raise PizooError(f"--to: unknown format '{to}'; use gguf or trtllm")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
