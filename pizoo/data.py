"""Training and evaluation text: documents -> tokens -> packed sequences.

Sources are local .txt files (one document each), .jsonl files (one document per line, the `text`
field), folders (searched recursively for both), globs, or a Hub dataset repo id (downloaded through
huggingface_hub's snapshot_download, then read like a folder). `None` means the default corpus.

The default corpus exists on any machine with Python, offline: the Python Language Reference and
library topics from `pydoc_data.topics`, joined as one long prose document (~465 KB), plus the
largest pure-Python standard-library modules as further long documents (source code). It is meant
for CI, smoke runs and tiny models; calibrate a real model on real long documents (books, papers).

Documents are indexed first (ids only, nothing kept in memory), then read one at a time. The
held-out split is document-level and deterministic: the documents with the smallest sha1(id), about
5% of them and at least one, so evaluation gets whole long documents that training never saw. With
a single document, its last 10% (cut at a line break) becomes the held-out document `ID#heldout`.

`PackedSequences` tokenizes documents in a seeded order (a new permutation each epoch), wraps each
in BOS/EOS and cuts the token stream into fixed-length sequences. Its position is the number of
sequences consumed; `start=` skips there again deterministically, which is how --resume continues
with exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import PizooError

HELDOUT_FRACTION = 0.05
SINGLE_DOC_HELDOUT_FRACTION = 0.10
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
DEFAULT_CORPUS_MODULES = 16
DEFAULT_CORPUS_NAME = "python-docs+stdlib (default offline corpus)"
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Document:
    id: str
    text: str
    source: str


@dataclass(frozen=True)
class _DocRef:
    """Where a document lives, so it can be read on demand (nothing is kept in memory)."""

    id: str
    source: str
    kind: str  # "text" | "jsonl" | "pydoc"
    path: str | None = None
    offset: int | None = None  # byte offset of a jsonl line


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


def _default_refs() -> list[_DocRef]:
    refs = [_DocRef(id="pydoc_data.topics", source="python-language-reference", kind="pydoc")]
    for p in _stdlib_module_paths():
        refs.append(_DocRef(id=f"stdlib/{p.name}", source="python-stdlib", kind="text", path=str(p)))
    return refs


def default_corpus_documents() -> list[Document]:
    """The offline default corpus: the Language Reference as one document plus large stdlib modules."""
    return [_load(ref) for ref in _default_refs()]


def default_corpus_note() -> str:
    return (f"no --data given: using the {DEFAULT_CORPUS_NAME}: the Python Language Reference and the "
            f"{DEFAULT_CORPUS_MODULES} largest stdlib modules. Fine for smoke tests; pass --data with long "
            "real documents for a real calibration")


# ------------------------------------------------------------------------------------------------
# Indexing sources


def _is_hub_dataset(spec: str) -> bool:
    return bool(_HUB_DATASET.match(spec)) and not Path(spec).exists()


def _fetch_hub_dataset(repo_id: str) -> Path:
    """Download a dataset repo's text files (snapshot_download), with the bounded waits and retries of
    every Hub call (hub_client.with_retries); any failure is one line naming --data."""
    try:
        from huggingface_hub import get_token, snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise PizooError(f"--data {repo_id}: huggingface_hub is not installed; pip install huggingface_hub") from None
    from .hub_client import bound_hub_requests, hub_endpoint, with_retries

    bound_hub_requests()  # a Hub that never answers must not hang the run
    endpoint = hub_endpoint()
    try:
        return Path(with_retries(
            lambda: snapshot_download(repo_id, repo_type="dataset", endpoint=endpoint, allow_patterns=[
                "*.txt", "*.jsonl", "*.md", "**/*.txt", "**/*.jsonl", "**/*.md"]),
            action="download the dataset", repo_id=repo_id, endpoint=endpoint, token=get_token()))
    except PizooError as e:  # network, auth and not-found errors: one line, with local files as the way out
        raise PizooError(f"--data {repo_id}: {e}; or pass local .txt/.jsonl files") from None


def _file_refs(path: Path, root: Path | None, source: str) -> list[_DocRef]:
    rel = path.relative_to(root).as_posix() if root is not None else path.name
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return [_DocRef(id=rel, source=source, kind="text", path=str(path))]
    if suffix in JSONL_SUFFIXES:
        refs = []
        try:
            with open(path, "rb") as f:
                offset, line_no = 0, 0
                for line in f:
                    line_no += 1
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except (json.JSONDecodeError, UnicodeDecodeError) as e:
                            raise PizooError(f"{path}: line {line_no} is not valid JSON ({e}); fix or remove it") from None
                        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                            raise PizooError(f"{path}: line {line_no} has no string 'text' field; each line must be "
                                             '{"text": "..."}')
                        doc_id = obj.get("id")
                        doc_id = f"{rel}:{doc_id}" if isinstance(doc_id, (str, int)) else f"{rel}:{line_no}"
                        refs.append(_DocRef(id=doc_id, source=source, kind="jsonl", path=str(path), offset=offset))
                    offset += len(line)
        except OSError as e:
            raise PizooError(f"{path}: cannot read: {e.strerror}") from None
        return refs
    raise PizooError(f"{path}: unsupported data file type '{suffix}'; use .txt or .jsonl (a 'text' field per line)")


def _folder_refs(folder: Path, source: str) -> list[_DocRef]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    refs: list[_DocRef] = []
    for p in files:
        refs.extend(_file_refs(p, folder, source))
    return refs


def _source_refs(spec: str) -> list[_DocRef]:
    path = Path(spec).expanduser()
    if path.is_dir():
        refs = _folder_refs(path, spec)
        if not refs:
            raise PizooError(f"{path}: folder holds no .txt or .jsonl files")
        return refs
    if path.is_file():
        return _file_refs(path, None, spec)
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [m for m in matches if m.is_file() and m.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES]
        if not files:
            raise PizooError(f"--data {spec}: the pattern matches no .txt or .jsonl files")
        refs = []
        for m in files:
            refs.extend(_file_refs(m, None, spec))
        return refs
    if _is_hub_dataset(spec):
        folder = _fetch_hub_dataset(spec)
        refs = _folder_refs(folder, spec)
        if not refs:
            raise PizooError(f"--data {spec}: the Hub dataset holds no .txt or .jsonl files")
        return refs
    raise PizooError(f"--data {spec}: no such file, folder or glob (nor a Hub dataset id owner/name)")


def _index(sources: list[str] | None) -> list[_DocRef]:
    if sources is None:
        return _default_refs()
    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    if not sources:
        raise PizooError("--data: no sources given; pass files, folders, globs or a Hub dataset id")
    refs: list[_DocRef] = []
    seen: set[str] = set()
    for spec in sources:
        for ref in _source_refs(str(spec)):
            if ref.id in seen:  # the same relative name from two sources: keep ids unique
                ref = _DocRef(**{**ref.__dict__, "id": f"{ref.source}/{ref.id}"})
            seen.add(ref.id)
            refs.append(ref)
    return refs


# A text file with more undecodable bytes than this (or any NUL byte) is binary data, not text:
# training on it would teach the model noise, so it is refused rather than silently "replaced".
MAX_INVALID_UTF8 = 0.001


def _decode_text(path: str, raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if b"\0" in raw or bad > MAX_INVALID_UTF8 * max(len(raw), 1):
        what = "NUL bytes" if b"\0" in raw else f"{bad} bytes that are not UTF-8"
        raise PizooError(f"{path}: not a text file ({what}); give UTF-8 text (.txt) or JSON lines (.jsonl) in --data")
    return text


def _load(ref: _DocRef) -> Document:
    if ref.kind == "pydoc":
        text = _pydoc_text()
    elif ref.kind == "text":
        try:
            text = _decode_text(ref.path, Path(ref.path).read_bytes())
        except OSError as e:
            raise PizooError(f"{ref.path}: cannot read: {e.strerror}") from None
    elif ref.kind == "jsonl":
        with open(ref.path, "rb") as f:
            f.seek(ref.offset)
            text = json.loads(f.readline())["text"]
    else:  # pragma: no cover - all kinds are handled above
        raise AssertionError(ref.kind)
    return Document(id=ref.id, text=text, source=ref.source)


# ------------------------------------------------------------------------------------------------
# Splits


def _id_hash(doc_id: str) -> str:
    return hashlib.sha1(doc_id.encode("utf-8")).hexdigest()


def heldout_ids(ids: list[str]) -> set[str]:
    """The held-out documents: the ~5% (at least one) with the smallest sha1(id)."""
    if len(ids) < 2:
        return set()
    k = max(1, round(len(ids) * HELDOUT_FRACTION))
    return set(sorted(ids, key=_id_hash)[:k])


@dataclass(frozen=True)
class _Split:
    """One document reference plus an optional character range (one-document corpora)."""

    ref: _DocRef
    part: str = "whole"  # "whole" | "head" | "tail"


def _single_doc_cut(text: str) -> int:
    cut = int(len(text) * (1 - SINGLE_DOC_HELDOUT_FRACTION))
    nl = text.rfind("\n", 0, cut)
    return nl + 1 if nl > len(text) // 2 else cut


def _select(refs: list[_DocRef], split: str) -> list[_Split]:
    if split not in ("train", "heldout", "all"):
        raise PizooError(f"split: unknown split '{split}'; use train, heldout or all")
    if split == "all":
        return [_Split(r) for r in refs]
    if len(refs) == 1:
        return [_Split(refs[0], "head" if split == "train" else "tail")]
    held = heldout_ids([r.id for r in refs])
    return [_Split(r) for r in refs if (r.id in held) == (split == "heldout")]


def _materialise(s: _Split) -> Document:
    doc = _load(s.ref)
    if s.part == "whole":
        return doc
    cut = _single_doc_cut(doc.text)
    if s.part == "head":
        return Document(id=doc.id, text=doc.text[:cut], source=doc.source)
    return Document(id=f"{doc.id}#heldout", text=doc.text[cut:], source=doc.source)


def iter_documents(sources: list[str] | None = None, split: str = "all") -> Iterator[Document]:
    """Yield documents one at a time (None: the default corpus). split: train | heldout | all."""
    for s in _select(_index(sources), split):
        yield _materialise(s)


def fingerprint_update(h, doc: Document) -> None:
    """Fold one document (its id and content) into a data fingerprint's running sha256."""
    h.update(doc.id.encode("utf-8") + b"\0")
    h.update(hashlib.sha256(doc.text.encode("utf-8")).digest())


def data_fingerprint(sources: list[str] | None = None, split: str = "all") -> str:
    """A stable sha256 over the documents' ids and content (identical data -> identical fingerprint)."""
    h = hashlib.sha256()
    for doc in iter_documents(sources, split):
        fingerprint_update(h, doc)
    return h.hexdigest()


def describe_sources(sources: list[str] | None) -> list[str]:
    return [DEFAULT_CORPUS_NAME] if sources is None else [str(s) for s in ([sources] if isinstance(sources, str) else sources)]


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


class PackedSequences:
    """A deterministic, streamed, endless stream of `seq_len`-token sequences (epoch after epoch).

    Epoch e reads the split's documents in a permutation seeded by (seed, e), tokenizes each one
    when it is needed and packs the tokens back to back; a sequence never mixes epochs. `start`
    skips that many sequences (the resume position); `position` counts sequences handed out.
    """

    def __init__(self, tokenizer_dir: str | Path, sources: list[str] | None, seq_len: int, *, seed: int = 0,
                 split: str = "train", bos: int | None = None, eos: int | None = None, start: int = 0):
        from .tokenizer import load_tokenizer

        if seq_len < 2:
            raise PizooError(f"sequence length {seq_len}: must be at least 2 tokens")
        self.tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.bos, self.eos = special_ids(self.tokenizer_dir, bos, eos)
        self.sources, self.seq_len, self.seed, self.split = sources, int(seq_len), int(seed), split
        self.splits = _select(_index(sources), split)
        if not self.splits:
            raise PizooError(f"--data {', '.join(describe_sources(sources))}: no {split} documents")
        self.position = 0
        self.epoch = 0
        self.documents_read = 0
        self.tokens_read = 0
        self._stream = self._generate()
        self.skip(start)

    def _epoch_order(self, epoch: int) -> list[_Split]:
        order = list(self.splits)
        random.Random(f"pizoo-data:{self.seed}:{epoch}").shuffle(order)
        return order

    def _generate(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            self.epoch = epoch
            buf: list[int] = []
            produced = 0
            for s in self._epoch_order(epoch):
                doc = _materialise(s)
                ids = encode_document(self.tokenizer, doc.text, self.bos, self.eos)
                if epoch == 0:
                    self.documents_read += 1
                    self.tokens_read += len(ids)
                buf.extend(ids)
                # Walk an offset and compact once per document: slicing the front off after every
                # sequence would copy the rest each time (quadratic in a long document's length).
                start = 0
                while len(buf) - start >= self.seq_len:
                    produced += 1
                    yield buf[start:start + self.seq_len]
                    start += self.seq_len
                del buf[:start]
            if produced == 0:
                raise PizooError(
                    f"--data {', '.join(describe_sources(self.sources))}: only {len(buf)} tokens in the {self.split} "
                    f"split, fewer than one sequence of {self.seq_len}; give more data or a smaller --train-len")
            epoch += 1

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
