"""B7: the calibration data stream, tokens/s and peak RSS as the corpus grows (pizoo vs `datasets` streaming).

    python bench/b7_data_stream.py [--sizes-mb 10,20,40] [--rounds 1]   # needs `pip install datasets`

The issue's sizes are 0.1 to 1 GB; on a 2-core shared machine the default is 10 to 40 MB of text
(from just above the shuffle pool's 4M tokens, ~8 MB here, to four times that), stated in the
results. `--sizes-mb 100,300,1000` is the issue's run. Both readers must count the same documents
and tokens (checked). The corpus is real prose (pizoo.synthetic.sample_text)
cut into documents of 1,000 to 40,000 characters at random offsets, written once per size as

- Parquet (pyarrow, row groups of 256 documents, a `text` column), and
- JSON lines compressed with zstd (`.jsonl.zst`, one frame per 256 documents).

Each (format, size, reader) runs in a fresh child process, so its peak RSS comes from the OS:

- pizoo: `PackedSequences` (what `pizoo calibrate` reads from) over one epoch of the corpus: the files
  streamed (Parquet a record batch at a time, zstd in 1 MiB chunks), tokenized in batches with the
  tokenizers library's own threads, through the seeded shuffle pool; the epoch's documents
  (`_epoch_documents(0)`: packing them into sequences is a slice per sequence and is left out);
- datasets: `load_dataset(..., streaming=True)` over the same file, batches of 64 rows
  (`.iter(batch_size=64)`), tokenized with the same tokenizer's `encode_batch`: what a user of
  the `datasets` library would write.

Both tokenize with the tiny test model's tokenizer (a byte-level BPE trained by pizoo.synthetic),
so the figures compare reading and batching, not tokenizers. Reported: tokens/s, peak RSS; targets:
pizoo's peak RSS at the largest size within 1.25x of the smallest's (flat memory), and pizoo's
tokens/s at the largest size at least the `datasets` stream's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULT_PREFIX, WORK_DIR, machine_info, medians, package_version, ratio, reproduce_command,
                    run_measured, table, target, versions, write_result)

FORMATS = ("parquet", "jsonl.zst")
READERS = ("pizoo", "datasets")
DOCS_PER_GROUP = 256
SEQ_LEN = 2049


def tokenizer_dir(work: Path) -> Path:
    from pizoo.synthetic import write_tiny_model

    folder = work / "b7-tokenizer-model"
    if not (folder / "tokenizer.json").is_file():
        write_tiny_model(folder, variant="llama", tokenizer="bpe")
    return folder


def _documents(target_bytes: int, seed: int):
    """Documents of real prose until target_bytes of text: random cuts of a 2 MB prose pool."""
    from pizoo.synthetic import sample_text

    pool = sample_text(2_000_000)
    rng = random.Random(seed)
    total = 0
    while total < target_bytes:
        n = rng.randint(1_000, 40_000)
        at = rng.randrange(0, len(pool) - n)
        text = pool[at:at + n]
        total += len(text.encode("utf-8"))
        yield text


def write_corpus(work: Path, size_mb: int) -> dict[str, Path]:
    """The corpus of size_mb MB of text as Parquet and as .jsonl.zst (written once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder = work / f"b7-corpus-{size_mb}mb"
    paths = {"parquet": folder / "corpus.parquet", "jsonl.zst": folder / "corpus.jsonl.zst"}
    if all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
    schema = pa.schema([("text", pa.string())])
    cctx = zstandard.ZstdCompressor(level=3)
    with pq.ParquetWriter(tmp["parquet"], schema) as pw, open(tmp["jsonl.zst"], "wb") as zf:
        group: list[str] = []

        def flush() -> None:
            pw.write_table(pa.table({"text": group}, schema=schema))
            zf.write(cctx.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in group)))
            group.clear()

        for text in _documents(size_mb * 1_000_000, seed=size_mb):
            group.append(text)
            if len(group) == DOCS_PER_GROUP:
                flush()
        if group:
            flush()
    for k in paths:
        os.replace(tmp[k], paths[k])
    return paths


# --- children -----------------------------------------------------------------------------------

def child_pizoo(path: str, tok: str) -> dict:
    from pizoo.data import PackedSequences

    start = time.perf_counter()
    stream = PackedSequences(tok, [path], SEQ_LEN, seed=0, split="all")
    tokens = docs = 0
    for ids in stream._epoch_documents(0):
        tokens += len(ids)
        docs += 1
    return {"tokens": tokens, "documents": docs, "seconds": time.perf_counter() - start}


def child_datasets(path: str, tok: str) -> dict:
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    from pizoo.data import special_ids
    from pizoo.tokenizer import load_tokenizer

    disable_progress_bar()
    start = time.perf_counter()
    tokenizer = load_tokenizer(tok)
    bos, eos = special_ids(Path(tok), None, None)
    extra = (bos is not None) + (eos is not None)  # pizoo's BOS/EOS per document, counted alike
    builder = "parquet" if path.endswith(".parquet") else "json"
    ds = load_dataset(builder, data_files=path, split="train", streaming=True)
    tokens = docs = 0
    for batch in ds.iter(batch_size=64):
        for enc in tokenizer.encode_batch(batch["text"], add_special_tokens=False):
            tokens += len(enc.ids) + extra
            docs += 1
    return {"tokens": tokens, "documents": docs, "seconds": time.perf_counter() - start}


def run_child(args) -> None:
    fn = child_pizoo if args.child == "pizoo" else child_datasets
    out = fn(args.path, args.tokenizer)
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# --- driver -------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="10,20,40")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--child", choices=READERS)
    ap.add_argument("--path")
    ap.add_argument("--tokenizer")
    args = ap.parse_args()
    if args.child:
        return run_child(args)
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise SystemExit("B7 compares with the datasets library: pip install datasets (in a virtualenv)")
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    machine, vers = machine_info(), versions(pyarrow=package_version("pyarrow"),
                                               zstandard=package_version("zstandard"),
                                               datasets=package_version("datasets"))
    tok = tokenizer_dir(WORK_DIR)
    corpora = {}
    for size in sizes:
        print(f"corpus {size} MB", flush=True)
        corpora[size] = write_corpus(WORK_DIR, size)
    runs = []
    for r in range(args.rounds):
        for size in sizes:
            for fmt in FORMATS:
                order = READERS if (r + sizes.index(size)) % 2 == 0 else READERS[::-1]
                for reader in order:
                    label = f"{fmt} {size}MB {reader}"
                    run = run_measured([sys.executable, __file__, "--child", reader, "--path",
                                        str(corpora[size][fmt]), "--tokenizer", str(tok)], label=label, round_=r)
                    runs.append(run)
                    print(f"  {label:<28} {run.reported['tokens_per_s']:>12,.0f} tokens/s  peak RSS "
                          f"{run.peak_rss_mib:7.1f} MiB  load {os.getloadavg()[0]:.1f}", flush=True)
    med = medians(runs, ("wall_s", "peak_rss_mib", "tokens_per_s", "tokens", "documents"))
    rows, ratios, targets = [], {}, []
    for fmt in FORMATS:
        for size in sizes:
            file_mb = corpora[size][fmt].stat().st_size / 1e6
            for reader in READERS:
                m = med[f"{fmt} {size}MB {reader}"]
                rows.append([fmt, size, round(file_mb, 1), reader, int(m["documents"]), int(m["tokens"]),
                             round(m["tokens_per_s"]), m["peak_rss_mib"]])
            ours, theirs = med[f"{fmt} {size}MB pizoo"], med[f"{fmt} {size}MB datasets"]
            if (ours["tokens"], ours["documents"]) != (theirs["tokens"], theirs["documents"]):
                raise SystemExit(f"{fmt} {size} MB: the readers disagree: pizoo {ours}, datasets {theirs}")
            ratios[f"{fmt} {size}MB"] = {"tokens_per_s": ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
                                         "peak_rss": ratio(ours["peak_rss_mib"], theirs["peak_rss_mib"])}
        small, large = med[f"{fmt} {sizes[0]}MB pizoo"], med[f"{fmt} {sizes[-1]}MB pizoo"]
        targets.append(target(f"{fmt}: pizoo peak RSS at {sizes[-1]} MB / at {sizes[0]} MB (flat memory)",
                              ratio(large["peak_rss_mib"], small["peak_rss_mib"]), 1.25))
        targets.append(target(f"{fmt} {sizes[-1]} MB: tokens/s, pizoo / datasets streaming",
                              ratios[f"{fmt} {sizes[-1]}MB"]["tokens_per_s"], 1.0, op=">="))
    notes = [f"Sizes are MB of text ({', '.join(map(str, sizes))}); the issue asks 0.1-1 GB: scaled down for a 2-core "
             "shared machine (`--sizes-mb 100,300,1000` runs it). The smallest already fills pizoo's shuffle pool "
             "(4M tokens), so its memory is the steady state.",
             "Both readers counted the same documents and tokens at every size (checked by the script).",
             "Tokens include one BOS and one EOS per document on both sides (pizoo wraps documents in them).",
             "pizoo's figure is its calibration stream over one epoch (read, tokenize in batches, shuffle pool); "
             "datasets' is `load_dataset(streaming=True)` rows tokenized in batches of 64 with the same tokenizer.",
             "The documents are cuts of one ~465 KB prose pool (the stdlib's pydoc topics), so zstd compresses the "
             ".jsonl.zst about 20x: its figures measure decompression and parsing of a small file, not disk reads."]
    path = write_result(
        "b7_data_stream", title="B7: the calibration data stream (pizoo vs datasets streaming)",
        command=reproduce_command(),
        settings={"sizes_mb": args.sizes_mb, "rounds": args.rounds, "formats": ", ".join(FORMATS),
                  "tokenizer": "pizoo.synthetic byte-level BPE (tiny test model)", "seq_len": SEQ_LEN,
                  "documents": "real prose, 1,000-40,000 characters", "row group / zstd frame": DOCS_PER_GROUP},
        runs=runs, medians_=med, ratios=ratios, targets=targets,
        tables=[table(["format", "text MB", "file MB", "reader", "documents", "tokens", "tokens/s", "peak RSS MiB"],
                      rows, "One epoch of the corpus, medians")],
        notes=notes, machine=machine, versions_=vers)
    print(path)


if __name__ == "__main__":
    main()
