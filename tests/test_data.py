"""Calibration and evaluation data: formats, Hub datasets, length filter and upsampling, bad input.

Every container is a real file written here with its own library (json + gzip / zstandard,
pyarrow with several row groups); the Hub dataset is served by the loopback Hub test server with a
refs/convert/parquet branch, like the Hub's automatic Parquet conversion. The oracle for the
tokens is the tokenizers library applied to the texts directly.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pizoo.errors import PizooError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

SEQ = 65  # 64 training tokens + 1 (PackedSequences hands out T + 1 tokens)


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> Path:
    return tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """40 documents of 40 to 2,400 characters cut from real prose."""
    from pizoo.synthetic import sample_text

    prose = sample_text(70_000)
    rng = random.Random(7)
    out, at = [], 0
    for _ in range(40):
        n = rng.choice([40, 120, 400, 900, 2400])
        out.append(prose[at:at + n])
        at += n
    return out


def _jsonl(texts: list[str]) -> bytes:
    return b"".join(json.dumps({"text": t, "n": i}).encode() + b"\n" for i, t in enumerate(texts))


def write_corpus(folder: Path, texts: list[str], kind: str) -> Path:
    """The same corpus in one container: corpus.<kind> in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"corpus.{kind}"
    if kind == "jsonl":
        path.write_bytes(_jsonl(texts))
    elif kind == "jsonl.gz":
        path.write_bytes(gzip.compress(_jsonl(texts)))
    elif kind == "jsonl.zst":
        # two frames: readers must not stop at the first one
        half = len(texts) // 2
        c = zstandard.ZstdCompressor()
        path.write_bytes(c.compress(_jsonl(texts[:half])) + c.compress(_jsonl(texts[half:])))
    elif kind == "parquet":
        pq.write_table(pa.table({"n": list(range(len(texts))), "text": texts}), path, row_group_size=7)
    else:
        raise AssertionError(kind)
    return path


KINDS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, texts) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    return {k: write_corpus(root / k.replace(".", "-"), texts, k) for k in KINDS}


def test_same_documents_tokens_and_fingerprint_whatever_the_container(model, corpora, texts):
    from pizoo.data import PackedSequences, data_fingerprint, iter_documents
    from pizoo.tokenizer import load_tokenizer

    assert pq.ParquetFile(corpora["parquet"]).metadata.num_row_groups == 6
    ref = [(d.id, d.text) for d in iter_documents([str(corpora["jsonl"])])]
    assert [t for _, t in ref] == texts and ref[0][0] == "corpus:1"
    heldout = [d.id for d in iter_documents([str(corpora["jsonl"])], "heldout")]
    assert len(heldout) == 2  # 5% of 40
    streams = {}
    for kind, path in corpora.items():
        assert [(d.id, d.text) for d in iter_documents([str(path)])] == ref, kind
        assert [d.id for d in iter_documents([str(path)], "heldout")] == heldout, kind
        fps = {split: data_fingerprint([str(path)], split) for split in ("train", "heldout", "all")}
        streams[kind] = (fps, PackedSequences(model, [str(path)], SEQ, seed=3).take(40))
    assert all(v == streams["jsonl"] for v in streams.values())
    # epoch 0 is every train document, tokenized by the tokenizer itself and wrapped in BOS ... EOS
    tok = load_tokenizer(model)
    stream = PackedSequences(model, [str(corpora["parquet"])], SEQ, seed=3)
    train = [tok.encode(d.text, add_special_tokens=False).ids for d in iter_documents([str(corpora["jsonl"])], "train")]
    expected = sorted([stream.bos, *ids, stream.eos] for ids in train)
    flat = [t for seq in stream.take(sum(len(d) for d in expected) // SEQ) for t in seq]
    starts = [i for i, t in enumerate(flat) if t == stream.bos] + [len(flat)]
    docs = sorted(flat[a:b] for a, b in zip(starts, starts[1:]))
    whole = [d for d in docs if d[-1] == stream.eos]
    assert len(whole) >= len(expected) - 1 and all(d in expected for d in whole)


def test_resume_is_exact_across_epochs_and_fingerprints_are_stable(model, corpora):
    from pizoo.data import PackedSequences, data_fingerprint

    path = [str(corpora["jsonl.zst"])]
    whole = PackedSequences(model, path, SEQ, seed=1, min_doc_tokens=10, upsample_long=2)
    first = []
    while whole.epoch < 1:  # into the second epoch
        first += whole.take(1)
    first += whole.take(20)
    assert whole.stats_complete
    at = len(first) - 60
    resumed = PackedSequences(model, path, SEQ, seed=1, start=at, min_doc_tokens=10, upsample_long=2)
    assert resumed.take(60) == first[at:]
    other_seed = PackedSequences(model, path, SEQ, seed=2, min_doc_tokens=10, upsample_long=2).take(20)
    assert other_seed != first[:20]
    assert data_fingerprint(path, "train") == data_fingerprint(path, "train")
    assert data_fingerprint(path, "train") != data_fingerprint(path, "heldout")


def test_length_filter_and_upsampling_counts_match_the_log_and_calibration_json(model, corpora, tmp_path):
    """--min-doc-tokens and --upsample-long: calibration.json and the log give the counts an
    independent count of the train documents' tokens predicts."""
    from pizoo.data import iter_documents
    from pizoo.tokenizer import load_tokenizer
    from pizoo.train import calibrate

    path = str(corpora["parquet"])
    tok = load_tokenizer(model)
    lengths = [len(tok.encode(d.text, add_special_tokens=False).ids) for d in iter_documents([path], "train")]
    min_tokens, train_len, factor = 40, 64, 3
    kept = [n for n in lengths if n >= min_tokens]
    long = [n for n in kept if n > train_len]
    assert len(kept) < len(lengths) and long and len(long) < len(kept)
    total = sum(n + 2 for n in kept) + (factor - 1) * sum(n + 2 for n in long)
    steps = total // (4 * (train_len + 1)) + 1  # a little more than one epoch
    lines: list[str] = []
    calibrate(str(model), tmp_path / "out", ctx=256, recipe="pi", data=[path], steps=steps, train_len=train_len,
              global_batch=4, lr=1e-4, progress=False, min_doc_tokens=min_tokens, upsample_long=factor,
              log=lines.append)
    data = json.loads((tmp_path / "out" / "calibration.json").read_text())["data"]
    stats = data["per_source"][path]
    assert data["complete_epoch"] and data["min_doc_tokens"] == min_tokens and data["upsample_long"] == factor
    assert stats == {"documents": len(kept), "tokens": sum(n + 2 for n in kept),
                     "dropped_documents": len(lengths) - len(kept),
                     "dropped_tokens": sum(n + 2 for n in lengths if n < min_tokens),
                     "repeated_documents": len(long), "repeated_tokens": (factor - 1) * sum(n + 2 for n in long)}
    assert data["tokens"] == total and data["documents"] == len(lengths)
    line = next(x for x in lines if x.startswith(f"data: {path}:"))
    assert (f"{len(kept):,} documents, {stats['tokens']:,} tokens; dropped {len(lengths) - len(kept):,} shorter "
            f"than {min_tokens:,} tokens" in line) and f"{len(long):,} longer than {train_len:,} tokens repeated x3" in line

    # Ctrl-C part way (at the 12th write: the state is saved at the next step), then the same command
    # again: resumed from the Parquet stream's position, the weights and the counts are the uninterrupted run's.
    import signal

    from pizoo.errors import Interrupted
    from pizoo.fsutil import install_fault_hook
    from pizoo.train import state_dir_for

    resumed = tmp_path / "resumed"
    args = dict(ctx=256, recipe="pi", data=[path], steps=steps, train_len=train_len, global_batch=4, lr=1e-4,
                progress=False, min_doc_tokens=min_tokens, upsample_long=factor)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        install_fault_hook("int:12")
        with pytest.raises(Interrupted):
            calibrate(str(model), resumed, log=lambda m: None, **args)
    finally:
        signal.signal(signal.SIGINT, handler)
    at = json.loads(sorted(state_dir_for(resumed).glob("step-*/trainer.json"))[-1].read_text())["step"]
    assert 0 < at < steps and not resumed.exists()
    again: list[str] = []
    calibrate(str(model), resumed, log=again.append, **args)
    assert any(f"resuming from" in x and f"(step {at}" in x for x in again), again
    assert (resumed / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()
    assert json.loads((resumed / "calibration.json").read_text())["data"] == data


def test_text_field_and_mixed_sources(model, tmp_path, texts):
    """--text-field names the column; files, folders and globs of different formats mix in one --data."""
    from pizoo.data import DataSpec, iter_documents

    pq.write_table(pa.table({"body": texts[:5]}), tmp_path / "a.parquet")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "b.txt.gz").write_bytes(gzip.compress(texts[5].encode()))
    (tmp_path / "txt" / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(texts[6].encode()))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": texts[7]}) + "\n")
    spec = DataSpec((str(tmp_path / "a.parquet"), str(tmp_path / "txt"), str(tmp_path / "d*.jsonl")), "body")
    docs = list(iter_documents(spec))
    assert [d.text for d in docs] == texts[:8]
    assert [d.id for d in docs][4:] == ["a:5", "b", "c", "d:1"]
    with pytest.raises(PizooError, match=r"no column 'text' \(columns: body\); pass --text-field"):
        list(iter_documents([str(tmp_path / "a.parquet")]))


def _bad_inputs(root: Path, texts: list[str]) -> dict[str, tuple[Path, str]]:
    """name -> (file, a pattern its one-line error must match)."""
    good = root / "good.parquet"
    pq.write_table(pa.table({"text": texts[:20]}), good, row_group_size=5)
    corrupt = root / "corrupt.parquet"
    raw = good.read_bytes()
    corrupt.write_bytes(raw[:len(raw) // 2] + raw[-8:])  # footer kept, data cut: pyarrow opens it, decoding fails
    truncated = root / "cut.jsonl.zst"
    z = zstandard.ZstdCompressor().compress(_jsonl(texts * 20))
    truncated.write_bytes(z[:len(z) // 2])
    missing = root / "missing.parquet"
    pq.write_table(pa.table({"content": texts[:3]}), missing)
    numeric = root / "numeric.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numeric)
    empty = root / "empty.parquet"
    with pq.ParquetWriter(empty, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": texts[:2]}))
        w.write_table(pa.table({"text": pa.array([], pa.string())}))
    gz = root / "cut.jsonl.gz"
    g = gzip.compress(_jsonl(texts))
    gz.write_bytes(g[:len(g) // 2])
    return {
        "corrupt parquet": (corrupt, r"corrupt\.parquet: not a valid Parquet file .*re-download or rewrite it"),
        "truncated zst": (truncated, r"cut\.jsonl\.zst: the zstd stream is truncated .*recompress"),
        "truncated gz": (gz, r"cut\.jsonl\.gz: the gzip stream is truncated"),
        "missing column": (missing, r"missing\.parquet: no column 'text' \(columns: content\); pass --text-field"),
        "non-string column": (numeric, r"numeric\.parquet: column 'text' holds int64, not text; pass --text-field"),
        "empty row group": (empty, r"empty\.parquet: row group 1 is empty; rewrite the file"),
    }


def test_bad_input_is_one_line_naming_the_file_and_exit_2(model, tmp_path, texts):
    from typer.testing import CliRunner

    from pizoo.cli import app

    for name, (path, pattern) in _bad_inputs(tmp_path, texts).items():
        r = CliRunner().invoke(app, ["calibrate", str(model), "--ctx", "128", "--data", str(path), "--steps", "1",
                                     "--train-len", "32", "--global-batch", "1", "--out", str(tmp_path / "out")])
        errors = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert r.exit_code == 2 and "Traceback" not in r.output and len(errors) == 1, (name, r.output)
        assert re.search(pattern, errors[0]), (name, errors[0])
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Hub datasets


@pytest.fixture
def hub_datasets(tmp_path, texts):
    """A loopback Hub with three datasets: plain .jsonl.zst on main; a script-only repo whose data lives
    in its refs/convert/parquet branch (train and test splits); and one with no usable file."""
    from hub_server import HubServer, dataset_key

    server = HubServer({}).start()
    state = server.state
    zst = zstandard.ZstdCompressor().compress(_jsonl(texts))
    state.create_dataset("org/zst", {"data/train.jsonl.zst": zst, "README.md": b"# card\n"})
    state.create_dataset("org/converted", {"converted.py": b"# a loading script\n", "README.md": b"# card\n"})
    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    pq.write_table(pa.table({"text": texts[:30]}), train, row_group_size=8)
    pq.write_table(pa.table({"text": texts[30:]}), test)
    state.add_branch(dataset_key("org/converted"), "refs/convert/parquet",
                     {"default/train/0000.parquet": train.read_bytes(), "default/test/0000.parquet": test.read_bytes()})
    state.create_dataset("org/unusable", {"data.csv": b"text\nhello\n"})
    yield server
    server.stop()


HUB_SCRIPT = """
import json, sys
from pizoo.data import DataSpec, data_fingerprint, iter_documents
from pizoo.errors import PizooError
spec = DataSpec((sys.argv[1],), revision=sys.argv[2] or None, files=sys.argv[3] or None)
try:
    docs = list(iter_documents(spec))
    print(json.dumps({"ids": [d.id for d in docs], "texts": [d.text for d in docs], "fp": data_fingerprint(spec)}))
except PizooError as e:
    print(json.dumps({"error": str(e)}))
"""


def test_hub_dataset_main_and_its_parquet_conversion_branch(hub_datasets, tmp_path, texts):
    env = {"HF_ENDPOINT": hub_datasets.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}

    def read(repo: str, revision: str = "", files: str = "", **extra: str) -> dict:
        p = subprocess.run([sys.executable, "-c", HUB_SCRIPT, repo, revision, files], capture_output=True, text=True,
                           timeout=180, env={**os.environ, **env, **extra})
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    zst = read("org/zst")
    assert zst["texts"] == texts and zst["ids"][:2] == ["data/train:1", "data/train:2"]
    # main holds only a loading script: the refs/convert/parquet branch is used, only the train file fetched
    before = len(hub_datasets.state.requests)
    conv = read("org/converted", files="default/train/*")
    assert conv["texts"] == texts[:30]
    fetched = {p for m, p in hub_datasets.state.requests[before:] if "/resolve/" in p}
    assert fetched and all(p.endswith("/default/train/0000.parquet") for p in fetched), fetched
    assert read("org/converted", revision="refs/convert/parquet")["texts"] == texts[30:] + texts[:30]
    # offline, from the Hub cache: the same documents and fingerprint, and no request
    before = len(hub_datasets.state.requests)
    assert read("org/converted", files="default/train/*", HF_HUB_OFFLINE="1") == conv
    assert len(hub_datasets.state.requests) == before

    for args, pattern in [
        (("org/unusable",), r"^--data org/unusable: no usable data file in main nor refs/convert/parquet"),
        (("org/zst", "", "*.parquet"), r"^--data org/zst: no usable data file matching --data-files \*\.parquet"),
        (("org/zst", "v9"), r"^--data org/zst: no revision 'v9'; check --data-revision"),
        (("org/missing",), r"^--data org/missing: no such Hub dataset"),
    ]:
        assert re.search(pattern, read(*args)["error"]), args
    # offline, never downloaded: one line that says what to do, and no request
    before = len(hub_datasets.state.requests)
    assert re.search(r"^--data org/unusable: offline \(HF_HUB_OFFLINE\) and the dataset is not in the Hub cache; "
                     r"connect once to download it, or pass local files$",
                     read("org/unusable", HF_HUB_OFFLINE="1")["error"])
    assert len(hub_datasets.state.requests) == before
    offline = read("org/never-cached", HF_HUB_OFFLINE="1")["error"]
    assert offline.startswith("--data org/never-cached: offline (HF_HUB_OFFLINE) and the dataset is not in the Hub cache")
