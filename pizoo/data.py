"""Training and evaluation text: documents -> tokens -> packed sequences.

Sources (`DataSpec`) are data files (pizoo.datafiles: .txt/.md, one document each; .jsonl and
.parquet, one document per record, the `text` field or --text-field; .txt/.jsonl also as .gz or
.zst), folders (searched recursively), globs, or a Hub dataset repo id (its data files, or its
refs/convert/parquet branch, downloaded into the Hub cache). `None` means the default corpus.

The default corpus exists on any machine with Python, offline: the Python Language Reference and
library topics from `pydoc_data.topics`, joined as one long prose document (~465 KB), plus the
largest pure-Python standard-library modules as further long documents (source code). It is meant
for CI, smoke runs and tiny models; calibrate a real model on real long documents (books, papers).

Sources are indexed first (files and document counts, no text kept), then read as streams.
Document ids are a file's relative name without its data suffix, plus `:N` (the record number) for
record files: the same corpus has the same ids, split and fingerprint whether it is stored as
.jsonl, .jsonl.zst or Parquet. The held-out split is document-level and deterministic: the
documents with the smallest sha1(id), about 5% of them and at least one, so evaluation gets whole
long documents that training never saw. With a single document, its last 10% (cut at a line break)
becomes the held-out document `ID#heldout`.

`PackedSequences` streams the split's documents in a seeded order (files permuted each epoch, a
bounded shuffle pool), tokenizes them in batches, wraps each in BOS/EOS, optionally drops short
and repeats long ones, and cuts the token stream into fixed-length sequences. Its position is the
number of sequences consumed; `start=` skips there again deterministically, which is how --resume
continues with exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import os
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .datafiles import SUPPORTED, DataFile, count_records, data_suffix, hub_dataset_files, iter_texts, record_prefix
from .errors import PizooError

HELDOUT_FRACTION = 0.05
SINGLE_DOC_HELDOUT_FRACTION = 0.10
DEFAULT_CORPUS_MODULES = 16
DEFAULT_CORPUS_NAME = "python-docs+stdlib (default offline corpus)"
DEFAULT_TEXT_FIELD = "text"
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class DataSpec:
    """What --data and its companion options name: sources (None: the default corpus), the field or
    column that holds the text, and for Hub datasets a revision and a glob of files to use."""

    sources: tuple[str, ...] | None = None
    text_field: str = DEFAULT_TEXT_FIELD
    revision: str | None = None
    files: str | None = None

    def record(self) -> dict[str, Any]:
        """The spec as recorded in calibration.json / run.json (defaults left out)."""
        out: dict[str, Any] = {"sources": describe_sources(self)}
        if self.text_field != DEFAULT_TEXT_FIELD:
            out["text_field"] = self.text_field
        if self.revision:
            out["revision"] = self.revision
        if self.files:
            out["files"] = self.files
        return out


    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (as_spec reads it back): how the pipeline hands the spec to calibration workers."""
        return {"sources": None if self.sources is None else list(self.sources), "text_field": self.text_field,
                "revision": self.revision, "files": self.files}


def as_spec(data) -> DataSpec:
    """A DataSpec from what callers pass as `data`: a DataSpec or its to_dict(), None, one source or a
    list of sources."""
    if isinstance(data, DataSpec):
        return data
    if data is None:
        return DataSpec()
    if isinstance(data, dict):
        sources = data.get("sources")
        return DataSpec(None if sources is None else tuple(sources), data.get("text_field") or DEFAULT_TEXT_FIELD,
                        data.get("revision"), data.get("files"))
    if isinstance(data, (str, os.PathLike)):
        return DataSpec((str(data),))
    return DataSpec(tuple(str(s) for s in data))


def cli_data_spec(data: list[str] | None, text_field: str = DEFAULT_TEXT_FIELD, revision: str | None = None,
                  files: str | None = None) -> DataSpec | None:
    """The DataSpec of the --data, --text-field, --data-revision and --data-files options (None: the default corpus)."""
    if not data:
        used = [name for name, v in (("--text-field", text_field != DEFAULT_TEXT_FIELD), ("--data-revision", revision),
                                     ("--data-files", files)) if v]
        if used:
            raise PizooError(f"{used[0]}: only applies to --data; pass --data with your files or Hub dataset")
        return None
    if not text_field.strip():
        raise PizooError("--text-field: empty; name the field or column that holds the text (default: text)")
    return DataSpec(tuple(data), text_field, revision or None, files or None)


@dataclass
class Document:
    id: str
    text: str
    source: str


@dataclass(frozen=True)
class _Unit:
    """One file (or the built-in Language Reference): `count` documents, read on demand as a stream.

    A single-document file's document id is `id`; a record file's documents are `id:1`, `id:2`, ...
    (the record number), so ids do not depend on the container (.jsonl, .jsonl.zst, .parquet).
    """

    id: str
    source: str
    file: DataFile | None  # None: the pydoc Language Reference
    count: int = 1

    def doc_ids(self) -> Iterator[str]:
        if self.file is None or self.file.single_document:
            yield self.id
        else:
            for n in range(1, self.count + 1):
                yield f"{self.id}:{n}"

    def documents(self, text_field: str) -> Iterator[Document]:
        if self.file is None:
            yield Document(self.id, _pydoc_text(), self.source)
            return
        for doc_id, text in zip(self.doc_ids(), iter_texts(self.file, text_field)):
            yield Document(doc_id, text, self.source)


# ------------------------------------------------------------------------------------------------
# The default corpus


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _stdlib_module_paths(n: int = DEFAULT_CORPUS_MODULES) -> list[Path]:
    """The n largest top-level pure-Python modules of this interpreter's standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib.glob("*.py") if p.is_file()]
    files.sort(key=lambda p: (-p.stat().st_size, p.name))
    return sorted(files[:n], key=lambda p: p.name)


def _default_units() -> list[_Unit]:
    units = [_Unit(id="pydoc_data.topics", source="python-language-reference", file=None)]
    for p in _stdlib_module_paths():
        units.append(_Unit(id=f"stdlib/{p.name}", source="python-stdlib", file=DataFile(str(p), "text", None)))
    return units


def default_corpus_documents() -> list[Document]:
    """The offline default corpus: the Language Reference as one document plus large stdlib modules."""
    return [doc for unit in _default_units() for doc in unit.documents(DEFAULT_TEXT_FIELD)]


def default_corpus_note() -> str:
    return (f"no --data given: using the {DEFAULT_CORPUS_NAME}: the Python Language Reference and the "
            f"{DEFAULT_CORPUS_MODULES} largest stdlib modules. Fine for smoke tests; pass --data with long "
            "real documents for a real calibration")


# ------------------------------------------------------------------------------------------------
# Indexing sources: files and their document counts (no text is kept)


def _is_hub_dataset(spec: str) -> bool:
    return bool(_HUB_DATASET.match(spec)) and not Path(spec).exists()


def _file_unit(path: Path, rel: str, source: str, text_field: str) -> _Unit:
    df = DataFile.of(path)
    return _Unit(id=record_prefix(path, rel), source=source, file=df, count=count_records(df, text_field))


def _data_files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and data_suffix(p) is not None
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _source_units(source: str, spec: DataSpec) -> list[_Unit]:
    path = Path(source).expanduser()
    tf = spec.text_field
    if path.is_dir():
        files = _data_files_under(path)
        if not files:
            raise PizooError(f"{path}: folder holds no data files; pizoo reads {SUPPORTED}")
        return [_file_unit(p, p.relative_to(path).as_posix(), source, tf) for p in files]
    if path.is_file():
        return [_file_unit(path, path.name, source, tf)]
    if any(ch in source for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(source), recursive=True))
        files = [m for m in matches if m.is_file() and data_suffix(m) is not None]
        if not files:
            raise PizooError(f"--data {source}: the pattern matches no data files; pizoo reads {SUPPORTED}")
        return [_file_unit(m, m.name, source, tf) for m in files]
    if _is_hub_dataset(source):
        return [_file_unit(Path(local), rel, source, tf)
                for rel, local in hub_dataset_files(source, spec.revision, spec.files)]
    raise PizooError(f"--data {source}: no such file, folder or glob (nor a Hub dataset id owner/name)")


def _index(data) -> list[_Unit]:
    spec = as_spec(data)
    if spec.sources is None:
        return _default_units()
    if not spec.sources:
        raise PizooError("--data: no sources given; pass files, folders, globs or a Hub dataset id")
    units: list[_Unit] = []
    seen: set[str] = set()
    for source in spec.sources:
        for unit in _source_units(source, spec):
            if unit.id in seen:  # the same relative name from two sources: keep ids unique
                unit = _Unit(f"{unit.source}/{unit.id}", unit.source, unit.file, unit.count)
            seen.add(unit.id)
            units.append(unit)
    return units


# ------------------------------------------------------------------------------------------------
# Splits


def _id_hash(doc_id: str) -> str:
    return hashlib.sha1(doc_id.encode("utf-8")).hexdigest()


def heldout_ids(ids: Sequence[str]) -> set[str]:
    """The held-out documents: the ~5% (at least one) with the smallest sha1(id)."""
    if len(ids) < 2:
        return set()
    k = max(1, round(len(ids) * HELDOUT_FRACTION))
    return set(heapq.nsmallest(k, ids, key=_id_hash))


@dataclass
class _Selection:
    """The documents of a split: units in index order, plus which ids belong (or a cut single document)."""

    units: list[_Unit]
    split: str
    held: set[str] = field(default_factory=set)
    single: bool = False  # a one-document corpus: train is its head, heldout its tail

    @property
    def count(self) -> int:
        total = sum(u.count for u in self.units)
        if self.split == "all" or self.single:
            return total
        return len(self.held) if self.split == "heldout" else total - len(self.held)

    def documents(self, units: list[_Unit], text_field: str) -> Iterator[Document]:
        """The split's documents of `units` (all of them, or an epoch's permutation) in that order."""
        for unit in units:
            for doc in unit.documents(text_field):
                if self.single:
                    yield _cut(doc, self.split)
                elif self.split == "all" or (doc.id in self.held) == (self.split == "heldout"):
                    yield doc


def _single_doc_cut(text: str) -> int:
    cut = int(len(text) * (1 - SINGLE_DOC_HELDOUT_FRACTION))
    nl = text.rfind("\n", 0, cut)
    return nl + 1 if nl > len(text) // 2 else cut


def _cut(doc: Document, split: str) -> Document:
    if split == "all":
        return doc
    cut = _single_doc_cut(doc.text)
    if split == "train":
        return Document(id=doc.id, text=doc.text[:cut], source=doc.source)
    return Document(id=f"{doc.id}#heldout", text=doc.text[cut:], source=doc.source)


def _select(units: list[_Unit], split: str) -> _Selection:
    if split not in ("train", "heldout", "all"):
        raise PizooError(f"split: unknown split '{split}'; use train, heldout or all")
    total = sum(u.count for u in units)
    if split == "all":
        return _Selection(units, split)
    if total == 1:
        return _Selection(units, split, single=True)
    return _Selection(units, split, held=heldout_ids([i for u in units for i in u.doc_ids()]))


def iter_documents(data=None, split: str = "all") -> Iterator[Document]:
    """Yield documents one at a time, streamed (None: the default corpus). split: train | heldout | all."""
    spec = as_spec(data)
    units = _index(spec)
    yield from _select(units, split).documents(units, spec.text_field)


def fingerprint_update(h, doc: Document) -> None:
    """Fold one document (its id and content) into a data fingerprint's running sha256."""
    h.update(doc.id.encode("utf-8") + b"\0")
    h.update(hashlib.sha256(doc.text.encode("utf-8")).digest())


def data_fingerprint(data=None, split: str = "all") -> str:
    """A stable sha256 over the documents' ids and texts in source order. Ids are file names without
    the data suffix plus record numbers, so the same corpus has the same fingerprint whatever container
    holds it (.jsonl, .jsonl.gz, .jsonl.zst, .parquet with any row groups); renaming a file changes it."""
    h = hashlib.sha256()
    for doc in iter_documents(data, split):
        fingerprint_update(h, doc)
    return h.hexdigest()


def describe_sources(data) -> list[str]:
    spec = as_spec(data)
    if spec.sources is None:
        return [DEFAULT_CORPUS_NAME]
    rev = f"@{spec.revision}" if spec.revision else ""
    return [f"{s}{rev}" if _is_hub_dataset(s) else s for s in spec.sources]


# ------------------------------------------------------------------------------------------------
# Tokens and packed sequences


def special_ids(tokenizer_dir: Path, bos: int | None, eos: int | None) -> tuple[int | None, int | None]:
    """BOS/EOS ids: from config.json when given, else the tokenizer_config.json token names."""
    from .tokenizer import tokenizer_config

    if bos is not None and eos is not None:
        return bos, eos
    tok_cfg = tokenizer_config(tokenizer_dir)
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)

    def token_id(key: str) -> int | None:
        v = tok_cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return tok.token_to_id(v) if isinstance(v, str) else None

    return (bos if bos is not None else token_id("bos_token")), (eos if eos is not None else token_id("eos_token"))


def encode_document(tokenizer, text: str, bos: int | None, eos: int | None) -> list[int]:
    """Token ids of one document wrapped in BOS ... EOS (the tokenizer's own specials are not added)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])


TOKENIZE_BATCH_DOCS = 64
TOKENIZE_BATCH_CHARS = 1 << 20
SHUFFLE_POOL_TOKENS = 1 << 22  # ~16 MB of int32 tokens: bounds memory however large the corpus
SHUFFLE_POOL_DOCS = 4096


def encode_documents(tokenizer, texts: list[str], bos: int | None, eos: int | None) -> list[np.ndarray]:
    """encode_document for a batch, tokenized in parallel by the tokenizers library (encode_batch)."""
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    return [np.asarray(head + e.ids + tail, dtype=np.int32)
            for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


@dataclass
class SourceStats:
    """What one source gave the data stream (epoch 0): kept documents and tokens (BOS/EOS included),
    documents dropped as shorter than --min-doc-tokens, long documents repeated by --upsample-long."""

    documents: int = 0
    tokens: int = 0
    dropped_documents: int = 0
    dropped_tokens: int = 0
    repeated_documents: int = 0
    repeated_tokens: int = 0  # the extra tokens the repeats added

    def line(self, source: str, min_doc_tokens: int, upsample: int, long_tokens: int) -> str:
        out = f"data: {source}: {self.documents:,} documents, {self.tokens:,} tokens"
        if min_doc_tokens:
            out += (f"; dropped {self.dropped_documents:,} shorter than {min_doc_tokens:,} tokens "
                    f"({self.dropped_tokens:,} tokens)")
        if upsample > 1:
            out += (f"; {self.repeated_documents:,} longer than {long_tokens:,} tokens repeated x{upsample} "
                    f"(+{self.repeated_tokens:,} tokens)")
        return out


def _pack(carry: np.ndarray, ids: np.ndarray, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Append `ids` to the leftover `carry`; cut every complete n-token sequence off the front."""
    buf = np.concatenate([carry, ids]) if len(carry) else ids
    full = len(buf) // n
    return [buf[i * n:(i + 1) * n] for i in range(full)], buf[full * n:]


class PackedSequences:
    """A deterministic, streamed, endless stream of `seq_len`-token sequences (epoch after epoch).

    Epoch e visits the split's files in a permutation seeded by (seed, e) and streams each file's
    documents in order; they are tokenized in batches (encode_batch, the tokenizers library's own
    threads), filtered by length, upsampled when long, and pass through a seeded shuffle pool
    (SHUFFLE_POOL_TOKENS) before being packed back to back, so memory stays bounded however large
    the corpus. A sequence never mixes epochs. The order depends only on the documents (ids, texts,
    file order) and the seed, never on the container, so a corpus gives the same sequences from
    .jsonl, .jsonl.zst or Parquet. `start` skips that many sequences (the resume position);
    `position` counts sequences handed out.

    `min_doc_tokens` drops documents with fewer text tokens; `upsample_long` puts documents with
    more than `long_tokens` text tokens (default: seq_len - 1, the training length) into the pool
    that many times. `stats` holds what each source gave in epoch 0 (`stats_complete` once the
    whole split was read).
    """

    def __init__(self, tokenizer_dir: str | Path, sources, seq_len: int, *, seed: int = 0,
                 split: str = "train", bos: int | None = None, eos: int | None = None, start: int = 0,
                 min_doc_tokens: int = 0, upsample_long: int = 1, long_tokens: int | None = None):
        from .tokenizer import load_tokenizer

        if seq_len < 2:
            raise PizooError(f"sequence length {seq_len}: must be at least 2 tokens")
        if min_doc_tokens < 0:
            raise PizooError(f"--min-doc-tokens {min_doc_tokens}: must be >= 0")
        if upsample_long < 1 or int(upsample_long) != upsample_long:
            raise PizooError(f"--upsample-long {upsample_long}: must be a whole number >= 1 (1: no upsampling)")
        self.tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.bos, self.eos = special_ids(self.tokenizer_dir, bos, eos)
        self.spec = as_spec(sources)
        self.seq_len, self.seed, self.split = int(seq_len), int(seed), split
        self.min_doc_tokens, self.upsample_long = int(min_doc_tokens), int(upsample_long)
        self.long_tokens = int(seq_len - 1 if long_tokens is None else long_tokens)
        self.units = _index(self.spec)
        self.selection = _select(self.units, split)
        self.documents = self.selection.count
        if not self.documents:
            raise PizooError(f"--data {', '.join(describe_sources(self.spec))}: no {split} documents")
        self.position = 0
        self.epoch = 0
        self.stats: dict[str, SourceStats] = {}
        self.stats_complete = False
        self._stream = self._generate()
        self.skip(start)

    @property
    def documents_read(self) -> int:
        return sum(s.documents + s.dropped_documents for s in self.stats.values())

    @property
    def tokens_read(self) -> int:
        return sum(s.tokens + s.repeated_tokens for s in self.stats.values())

    def _epoch_units(self, epoch: int) -> list[_Unit]:
        order = list(self.units)
        random.Random(f"pizoo-data:{self.seed}:{epoch}").shuffle(order)
        return order

    def _tokenized(self, docs: Iterator[Document]) -> Iterator[tuple[Document, np.ndarray]]:
        batch: list[Document] = []
        chars = 0
        for doc in docs:
            batch.append(doc)
            chars += len(doc.text)
            if len(batch) >= TOKENIZE_BATCH_DOCS or chars >= TOKENIZE_BATCH_CHARS:
                yield from zip(batch, encode_documents(self.tokenizer, [d.text for d in batch], self.bos, self.eos))
                batch, chars = [], 0
        if batch:
            yield from zip(batch, encode_documents(self.tokenizer, [d.text for d in batch], self.bos, self.eos))

    def _copies(self, doc: Document, ids: np.ndarray, record: bool) -> int:
        """How many times a document enters the pool (0: dropped); counted in `stats` in epoch 0."""
        text_tokens = len(ids) - (self.bos is not None) - (self.eos is not None)
        copies = (0 if text_tokens < self.min_doc_tokens
                  else self.upsample_long if text_tokens > self.long_tokens else 1)
        if record:
            s = self.stats.setdefault(doc.source, SourceStats())
            if copies == 0:
                s.dropped_documents += 1
                s.dropped_tokens += len(ids)
            else:
                s.documents += 1
                s.tokens += len(ids)
                if copies > 1:
                    s.repeated_documents += 1
                    s.repeated_tokens += (copies - 1) * len(ids)
        return copies

    def _epoch_documents(self, epoch: int) -> Iterator[np.ndarray]:
        """The epoch's token arrays in pool order (a seeded shuffle within a bounded pool)."""
        rng = random.Random(f"pizoo-data:{self.seed}:{epoch}:pool")
        pool: list[np.ndarray] = []
        pool_tokens = 0
        docs = self.selection.documents(self._epoch_units(epoch), self.spec.text_field)
        for doc, ids in self._tokenized(docs):
            for _ in range(self._copies(doc, ids, record=epoch == 0)):
                pool.append(ids)
                pool_tokens += len(ids)
            while pool and (pool_tokens > SHUFFLE_POOL_TOKENS or len(pool) > SHUFFLE_POOL_DOCS):
                i = rng.randrange(len(pool))
                pool[i], pool[-1] = pool[-1], pool[i]
                out = pool.pop()
                pool_tokens -= len(out)
                yield out
        rng.shuffle(pool)
        yield from pool

    def _generate(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            self.epoch = epoch
            carry = np.empty(0, dtype=np.int32)
            produced = 0
            for ids in self._epoch_documents(epoch):
                seqs, carry = _pack(carry, ids, self.seq_len)
                for seq in seqs:
                    produced += 1
                    yield seq.tolist()
            if epoch == 0:
                self.stats_complete = True
            if produced == 0:
                src = ", ".join(describe_sources(self.spec))
                if self.min_doc_tokens and not any(s.documents for s in self.stats.values()):
                    raise PizooError(f"--data {src}: every {self.split} document is shorter than --min-doc-tokens "
                                     f"{self.min_doc_tokens}; lower it or give longer documents")
                raise PizooError(
                    f"--data {src}: only {len(carry)} tokens in the {self.split} split, fewer than one sequence of "
                    f"{self.seq_len}; give more data or a smaller --train-len")
            epoch += 1

    def stats_lines(self) -> list[str]:
        """One log line per source: documents and tokens given, dropped, repeated (epoch 0 so far)."""
        return [s.line(src, self.min_doc_tokens, self.upsample_long, self.long_tokens)
                for src, s in self.stats.items()]

    def stats_record(self) -> dict[str, Any]:
        """For calibration.json: the split's size, the length settings, and what each source gave."""
        return {"documents": self.documents, "tokens": self.tokens_read, "min_doc_tokens": self.min_doc_tokens,
                "upsample_long": self.upsample_long, "long_tokens": self.long_tokens,
                "complete_epoch": self.stats_complete,
                "per_source": {src: vars(s).copy() for src, s in self.stats.items()}}

    def skip(self, n: int) -> None:
        """Advance past n sequences (re-tokenizing deterministically, so the order is exact)."""
        for _ in range(int(n)):
            next(self._stream)
            self.position += 1

    def take(self, n: int) -> list[list[int]]:
        out = [next(self._stream) for _ in range(n)]
        self.position += n
        return out

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.take(1)[0]
