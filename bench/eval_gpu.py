"""Benchmark: sliding-window perplexity throughput and peak memory at long contexts, on a GPU.

    python bench/eval_gpu.py                              # SmolLM2-135M-shaped synthetic model
    python bench/eval_gpu.py --model path/to/SmolLM2-135M # a real HF folder, .gguf, zoo name or Hub id
    python bench/eval_gpu.py --device cpu --ctx 512,1024 --windows 2   # smoke run without a GPU

For each context length it times `pizoo.eval.perplexity.sliding_window_perplexity` (bf16 + SDPA on CUDA,
the same code `pizoo eval` runs) over one document sized to give exactly --windows windows at
--stride, after one warm-up window, and records forward tokens/s (tokens through the model),
scored tokens/s, an estimate of achieved forward TFLOP/s (2 x non-embedding params + 2 x layers x
ctx x heads x head_dim per token: QK^T and AV over a causal half of the window, the head
excluded) and peak GPU memory (torch.cuda.max_memory_allocated). Throughput does not depend on
the token values, so the document is seeded random ids.

Results go to bench/results/eval_gpu-<device>-<UTC time>.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pizoo.eval.batching import auto_batch_size, resolve_dtype  # noqa: E402
from pizoo.eval.perplexity import sliding_window_perplexity  # noqa: E402
from pizoo.fsutil import atomic_write_json  # noqa: E402

# SmolLM2-135M's shape (config.json of HuggingFaceTB/SmolLM2-135M).
SMOLLM2_135M = dict(hidden_size=576, num_layers=30, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                    vocab_size=49152, max_position_embeddings=8192)


def synthetic_smollm2(folder: Path) -> Path:
    from pizoo.synthetic import write_synthetic_llama

    return write_synthetic_llama(folder / "smollm2-135m-shape", dtype=torch.bfloat16, tokenizer="bpe",
                                 **SMOLLM2_135M)


def forward_flops_per_token(cfg, ctx: int) -> float:
    """2N (matmuls, non-embedding) + 2 x L x ctx x H x Q (causal QK^T and AV, halved)."""
    return 2 * cfg.num_non_embedding_params() + 2 * cfg.num_layers * ctx * cfg.num_heads * cfg.head_dim


def bench_one(model, ctx: int, stride: int, windows: int, batch_tokens: int | None, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(ctx)
    n_tokens = ctx + (windows - 1) * stride
    doc = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=gen)
    sliding_window_perplexity(model, [doc[:ctx]], ctx, stride, batch_tokens=batch_tokens)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    res = sliding_window_perplexity(model, [doc], ctx, stride, batch_tokens=batch_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    row = {"ctx": ctx, "stride": stride, "windows": res.windows, "batch_size": auto_batch_size(model, ctx, batch_tokens),
           "forward_tokens": res.forward_tokens, "scored_tokens": res.tokens, "seconds": round(seconds, 3),
           "forward_tokens_per_s": round(res.forward_tokens / seconds, 1),
           "scored_tokens_per_s": round(res.tokens / seconds, 1),
           "forward_tflops": round(res.forward_tokens * forward_flops_per_token(model.config, ctx) / seconds / 1e12, 2),
           "ppl": res.ppl}
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    else:
        row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder, .gguf, zoo name or Hub id (default: SmolLM2-135M-shaped synthetic)")
    ap.add_argument("--ctx", default="8192,16384,32768")
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16, help="windows timed per context")
    ap.add_argument("--batch-tokens", type=int, default=None, help="tokens per forward (default: pizoo's auto)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    from pizoo.model import load_model
    from pizoo.resolve import resolve_model

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --device cpu for a smoke run", file=sys.stderr)
        return 2
    dtype = resolve_dtype(args.dtype, device)
    contexts = [int(c) for c in args.ctx.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path, model_desc = resolve_model(args.model).path, args.model
        else:
            path, model_desc = synthetic_smollm2(Path(tmp)), "synthetic SmolLM2-135M shape (random bf16 weights)"
        model = load_model(path, device=device, dtype=dtype)
        rows = []
        for ctx in contexts:
            try:
                row = bench_one(model, ctx, args.stride, args.windows, args.batch_tokens, device)
            except Exception as e:  # record an out-of-memory or other failure and go on to the next length
                row = {"ctx": ctx, "error": str(e).splitlines()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"benchmark": "eval_gpu", "model": model_desc, "device": name, "dtype": str(dtype).removeprefix("torch."),
              "torch": torch.__version__, "time_utc": stamp, "stride": args.stride, "windows": args.windows,
              "results": rows}
    out = args.out / f"eval_gpu-{'cuda' if device.type == 'cuda' else 'cpu'}-{stamp}.json"
    atomic_write_json(out, result)
    print(f"\n{'ctx':>7} {'fwd tok/s':>11} {'scored tok/s':>13} {'TFLOP/s':>8} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['ctx']:>7}  error: {r['error']}")
        else:
            peak = r.get("peak_memory_gib", r.get("peak_rss_gib"))
            print(f"{r['ctx']:>7} {r['forward_tokens_per_s']:>11} {r['scored_tokens_per_s']:>13} "
                  f"{r['forward_tflops']:>8} {peak:>9}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
