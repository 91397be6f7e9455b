"""B8: memory of a sliding-window forward at long context on CPU (blocked attention vs a [T, T] mask).

    python bench/b8_sliding_window.py [--lengths 4096,16384] [--dense-lengths 4096]

The model is a tiny Gemma-3-shaped network written in memory (hidden 256, 4 query heads of 64 over
2 KV heads, 4 layers of which 3 are local with a 1024-token window and 1 global, GELU-tanh MLP 1024,
vocab 512), float32, no gradients, batch 1. Two ways to run its local layers:

- blocked: `pizoo.model.attend` as pizoo runs it. Queries go 512 at a time against only the keys
  they can see, so the largest temporary is [heads, 512, 512 + 1024] and memory grows linearly in T.
- dense mask: the form pizoo used before 0.2 (and what an eager implementation does): one [T, T] boolean
  mask and one SDPA call over it. On CPU SDPA's masked path materialises [heads, T, T] float32 scores
  (4 GiB at 16k for 4 heads), so it runs only at the --dense-lengths.

Each (variant, length) runs in a fresh child process, so its peak RSS (from the OS) is its own; the
child reports its resident memory after building the model and the forward's seconds. The target is
the stated bound: the forward adds at most 512 MiB at 16k tokens (a [T, T] float32 score matrix for
one head alone is 1 GiB there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (RESULT_PREFIX, WORK_DIR, Run, machine_info, reproduce_command, run_measured, table, target,
                    versions, write_result)

BOUND_MIB = 512.0  # what the forward may add at BOUND_AT tokens
BOUND_AT = 16384
WINDOW = 1024


def rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def child_main(seq_len: int, variant: str) -> None:
    import torch
    import torch.nn.functional as F

    import pizoo.model as model_module
    from pizoo.config import ModelConfig, RopeConfig
    from pizoo.model import LlamaModel

    if variant == "dense mask":
        def dense(q, k, v, *, past, scale, window, cap, block=0):
            T = q.shape[2]
            i = torch.arange(T)
            mask = i[None, :] <= i[:, None]
            if window is not None:
                mask &= i[None, :] > i[:, None] - window
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])

        model_module.attend = dense
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="gemma3_text", vocab_size=512, hidden_size=256, intermediate_size=1024,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=seq_len,
                      rope=RopeConfig(theta=1e6), tie_word_embeddings=True, norm_offset=True,
                      hidden_act="gelu_tanh", sandwich_norms=True, embedding_scale=True, qk_norm=True,
                      query_pre_attn_scalar=64, sliding_window=WINDOW, sliding_window_layers=[0, 1, 2],
                      local_rope_theta=1e4)
    lm = LlamaModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len))
    built = rss_now_mib()
    start = time.perf_counter()
    with torch.no_grad():
        hidden = lm(ids)
    seconds = time.perf_counter() - start
    print(RESULT_PREFIX + json.dumps({"built_rss_mib": built, "forward_s": seconds,
                                      "checksum": float(hidden[0, -1].sum())}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--dense-lengths", default="4096", help="lengths the [T, T] mask variant also runs at")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.seq_len, args.child)
        return

    work = WORK_DIR / "b8"
    work.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    dense_lengths = [int(x) for x in args.dense_lengths.split(",") if x]
    runs: list[Run] = []
    plan = [("blocked", T) for T in lengths] + [("dense mask", T) for T in dense_lengths]
    for variant, T in plan:
        cmd = [sys.executable, __file__, "--child", variant, "--seq-len", str(T)]
        run = run_measured(cmd, label=f"{variant} @ {T}", log_path=work / f"{variant.replace(' ', '_')}-{T}.log")
        run.reported.update({"variant": variant, "seq_len": T,
                             "added_mib": round(run.peak_rss_mib - run.reported["built_rss_mib"], 1)})
        runs.append(run)
        print(f"  {variant:<10} T={T:<6} peak RSS {run.peak_rss_mib:8.1f} MiB, added by the forward "
              f"{run.reported['added_mib']:.1f} MiB, {run.reported['forward_s']:.1f} s", flush=True)

    added = {f"{r.reported['variant']} @ {r.reported['seq_len']}": r.reported["added_mib"] for r in runs}
    bounded = BOUND_AT if BOUND_AT in lengths else max(lengths)  # the bound is stated at 16k tokens
    blocked = {r.reported["seq_len"]: r.reported["added_mib"] for r in runs if r.reported["variant"] == "blocked"}
    dense = {r.reported["seq_len"]: r.reported["added_mib"] for r in runs if r.reported["variant"] == "dense mask"}
    ratios = {f"added at {T}, blocked / dense mask": round(blocked[T] / dense[T], 3)
              for T in dense if T in blocked and dense[T] > 0}
    targets = [target(f"blocked sliding-window forward at {bounded} tokens: MiB added to peak RSS",
                      blocked[bounded], BOUND_MIB, unit=" MiB")]
    rows = [[r.reported["variant"], r.reported["seq_len"], r.peak_rss_mib, r.reported["built_rss_mib"],
             r.reported["added_mib"], round(r.reported["forward_s"], 2)] for r in runs]
    write_result(
        "b8_sliding_window", title="B8: sliding-window forward memory on CPU (blocked attention vs [T, T] mask)",
        command=reproduce_command(), machine=machine_info(), versions_=versions(),
        settings={"model": "tiny Gemma-3-shaped (hidden 256, 4x64 heads, 2 KV, 3 local + 1 global layers), "
                           "float32, CPU, no grad", "window": WINDOW, "query block": 512, "batch": 1,
                  "lengths": args.lengths, "dense lengths": args.dense_lengths, "bound_mib": BOUND_MIB},
        runs=runs, medians_={"added_mib": added}, ratios=ratios, targets=targets,
        tables=[table(["variant", "T", "peak RSS MiB", "after build MiB", "added MiB", "forward s"], rows,
                      "One forward per child process")],
        notes=["The global layer runs SDPA's causal path in both variants (no mask tensor); what differs is the "
               "three local layers.",
               "Forward times are single runs on a shared 2-core machine; read them as rough indications only."])
    print("wrote bench/results/b8_sliding_window.json and bench/RESULTS.md")


if __name__ == "__main__":
    main()
