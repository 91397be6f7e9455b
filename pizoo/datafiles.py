"""Data files: which containers pizoo reads, counting and streaming their documents, Hub datasets.

A data file holds one document (`.txt`, `.md`, `.txt.gz`, `.txt.zst`) or one document per record
(`.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one JSON object per line; `.parquet`: one row). Records
carry their text in a field (`text` unless `--text-field` says otherwise). Everything is read as a
stream: lines through the `gzip` module or a `zstandard` decompressor, Parquet one record batch at
a time through pyarrow (a row group at most is in memory), so memory stays flat however large the
file is. Damaged input (a truncated .gz/.zst, a corrupt Parquet file, a missing or non-string text
column, an empty row group, a line that is not JSON) is a `PizooError` naming the file and the fix.

Hub datasets (`org/name`) are resolved to a list of such files: the repo's own data files at the
revision asked for, or, when it has none, those of its `refs/convert/parquet` branch (where the Hub
keeps an automatic Parquet conversion). Only the files used are downloaded, one at a time through
`hf_hub_download` into the Hub cache (resumable, shared with every other tool).
"""

from __future__ import annotations

import fnmatch
import functools
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import PizooError

# suffix -> (format, compression). Longest suffixes first so `.jsonl.zst` is not taken for `.zst`.
DATA_SUFFIXES: dict[str, tuple[str, str | None]] = {
    ".jsonl.zst": ("jsonl", "zstd"), ".jsonl.gz": ("jsonl", "gzip"), ".txt.zst": ("text", "zstd"),
    ".txt.gz": ("text", "gzip"), ".parquet": ("parquet", None), ".jsonl": ("jsonl", None),
    ".txt": ("text", None), ".md": ("text", None),
}
SUPPORTED = ".txt, .md, .jsonl, .parquet (and .txt/.jsonl compressed as .gz or .zst)"
PARQUET_BATCH_ROWS = 64
READ_CHUNK = 1 << 20
CONVERTED_PARQUET_REVISION = "refs/convert/parquet"
HUB_SKIP = ("README.md",)  # a dataset card is not a document


def data_suffix(path: str | Path) -> str | None:
    """The data suffix of a file name (`.jsonl.zst`, `.parquet`, ...) or None when pizoo cannot read it."""
    name = Path(path).name.lower()
    return next((s for s in DATA_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def record_prefix(path: str | Path, rel: str) -> str:
    """A file's document-id prefix: its relative name without the data suffix, so the same corpus has
    the same document ids (and split and fingerprint) whether it is stored as .jsonl, .jsonl.zst or .parquet."""
    suffix = data_suffix(path) or ""
    return rel[:len(rel) - len(suffix)] if suffix and rel.lower().endswith(suffix) else rel


@dataclass(frozen=True)
class DataFile:
    path: str
    format: str  # "text" | "jsonl" | "parquet"
    compression: str | None

    @classmethod
    def of(cls, path: str | Path) -> "DataFile":
        suffix = data_suffix(path)
        if suffix is None:
            raise PizooError(f"{path}: unsupported data file type; pizoo reads {SUPPORTED}")
        fmt, comp = DATA_SUFFIXES[suffix]
        return cls(str(path), fmt, comp)

    @property
    def single_document(self) -> bool:
        return self.format == "text"


# ------------------------------------------------------------------------------------------------
# Decompressed byte streams


def _zstd_chunks(f, path: str) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) .zst file; a frame cut short is an error, not an early EOF."""
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a dependency
        raise PizooError(f"{path}: reading .zst needs the zstandard package; pip install zstandard") from None
    dctx = zstandard.ZstdDecompressor()
    d, pending = dctx.decompressobj(), False
    try:
        while chunk := f.read(READ_CHUNK):
            while chunk:
                pending = True
                out = d.decompress(chunk)
                if out:
                    yield out
                chunk = b""
                if d.eof:
                    chunk, d, pending = d.unused_data, dctx.decompressobj(), False
    except zstandard.ZstdError as e:
        raise PizooError(f"{path}: not a valid zstd stream ({e}); re-download or recompress the file") from None
    if pending:
        raise PizooError(f"{path}: the zstd stream is truncated (the file ends inside a frame); re-download or "
                         "recompress the file")


def _gzip_chunks(f, path: str) -> Iterator[bytes]:
    try:
        with gzip.GzipFile(fileobj=f) as g:
            while chunk := g.read(READ_CHUNK):
                yield chunk
    except EOFError:
        raise PizooError(f"{path}: the gzip stream is truncated; re-download or recompress the file") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise PizooError(f"{path}: not a valid gzip file ({e}); re-download or recompress the file") from None


def _byte_chunks(df: DataFile) -> Iterator[bytes]:
    try:
        with open(df.path, "rb") as f:
            if df.compression == "zstd":
                yield from _zstd_chunks(f, df.path)
            elif df.compression == "gzip":
                yield from _gzip_chunks(f, df.path)
            else:
                while chunk := f.read(READ_CHUNK):
                    yield chunk
    except OSError as e:
        raise PizooError(f"{df.path}: cannot read: {e.strerror or e}") from None


def _lines(df: DataFile) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of a possibly compressed file, streamed."""
    rest, n = b"", 0
    for chunk in _byte_chunks(df):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for line in parts:
            n += 1
            yield n, line
    if rest:
        yield n + 1, rest


# ------------------------------------------------------------------------------------------------
# Parquet


def _parquet_file(df: DataFile, text_field: str):
    """An open pyarrow ParquetFile whose `text_field` column exists and holds strings."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise PizooError(f"{df.path}: reading Parquet needs pyarrow; pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(df.path)
    except OSError as e:
        if getattr(e, "strerror", None):
            raise PizooError(f"{df.path}: cannot read: {e.strerror}") from None
        raise PizooError(f"{df.path}: not a valid Parquet file ({str(e).splitlines()[0]}); re-download or "
                         "rewrite it") from None
    except (pa.ArrowException, ValueError) as e:
        raise PizooError(f"{df.path}: not a valid Parquet file ({str(e).splitlines()[0]}); re-download or "
                         "rewrite it") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise PizooError(f"{df.path}: no column '{text_field}' (columns: {', '.join(schema.names)}); pass "
                         "--text-field with the column that holds the text")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
        raise PizooError(f"{df.path}: column '{text_field}' holds {kind}, not text; pass --text-field with a "
                         "string column")
    for i in range(pf.metadata.num_row_groups):
        if pf.metadata.row_group(i).num_rows == 0:
            raise PizooError(f"{df.path}: row group {i} is empty; rewrite the file without empty row groups "
                             "(e.g. pyarrow.parquet.write_table)")
    return pf


def _parquet_texts(df: DataFile, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    pf = _parquet_file(df, text_field)
    row = 0
    try:
        # One row group at a time: memory stays one group's column however large the file (pyarrow's
        # iter_batches keeps growing with the file: 175 -> 260 MiB from 100 to 300 MB of text).
        for group in range(pf.metadata.num_row_groups):
            column = pf.read_row_group(group, columns=[text_field]).column(0)
            for start in range(0, len(column), PARQUET_BATCH_ROWS):
                for text in column.slice(start, PARQUET_BATCH_ROWS).to_pylist():
                    row += 1
                    if text is None:
                        raise PizooError(f"{df.path}: row {row} has no '{text_field}' (null); drop empty rows or "
                                         "pass --text-field with another column")
                    yield text
            del column
    except (pa.ArrowException, OSError) as e:
        raise PizooError(f"{df.path}: not a valid Parquet file ({str(e).splitlines()[0]}); re-download or "
                         "rewrite it") from None


# ------------------------------------------------------------------------------------------------
# Documents of a file


def count_records(df: DataFile, text_field: str) -> int:
    """How many documents a file holds (Parquet: from its metadata; JSON lines: non-blank lines)."""
    if df.single_document:
        return 1
    if df.format == "parquet":
        return _parquet_file(df, text_field).metadata.num_rows
    return sum(1 for _, line in _lines(df) if line.strip())


# A text file with more undecodable bytes than this (or any NUL byte) is binary data, not text:
# training on it would teach the model noise, so it is refused rather than silently "replaced".
MAX_INVALID_UTF8 = 0.001


def decode_text(path: str, raw: bytes) -> str:
    """A text file's bytes as text; a PizooError naming the file when they are binary, not UTF-8 text."""
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if b"\0" in raw or bad > MAX_INVALID_UTF8 * max(len(raw), 1):
        what = "NUL bytes" if b"\0" in raw else f"{bad} bytes that are not UTF-8"
        raise PizooError(f"{path}: not a text file ({what}); give UTF-8 text (.txt) or records (.jsonl, .parquet) "
                         "in --data")
    return text


def iter_texts(df: DataFile, text_field: str) -> Iterator[str]:
    """The texts of a file's documents in file order, streamed."""
    if df.format == "text":
        yield decode_text(df.path, b"".join(_byte_chunks(df)))
    elif df.format == "parquet":
        yield from _parquet_texts(df, text_field)
    else:
        for line_no, line in _lines(df):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise PizooError(f"{df.path}: line {line_no} is not valid JSON ({e}); fix or remove it") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise PizooError(f"{df.path}: line {line_no} has no string '{text_field}' field; each line must be "
                                 f'{{"{text_field}": "..."}} (or pass --text-field)')
            yield obj[text_field]


# ------------------------------------------------------------------------------------------------
# Hub datasets


def _usable(path: str, pattern: str | None) -> bool:
    if Path(path).name in HUB_SKIP or any(part.startswith(".") for part in path.split("/")):
        return False
    if data_suffix(path) is None:
        return False
    return pattern is None or fnmatch.fnmatch(path, pattern)


def _hub_error(repo_id: str, e: Exception, revision: str | None = None) -> PizooError:
    from huggingface_hub.errors import (LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return PizooError(f"--data {repo_id}: cannot reach the Hub (offline) and the files are not in the Hub "
                          "cache; connect once to download them, or pass local files")
    if isinstance(e, RepositoryNotFoundError):
        return PizooError(f"--data {repo_id}: no such Hub dataset (or it is private: log in with `hf auth login`); "
                          "check the repo id")
    if isinstance(e, RevisionNotFoundError):
        return PizooError(f"--data {repo_id}: no revision '{revision}'; check --data-revision")
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return PizooError(f"--data {repo_id}: cannot download the Hub dataset ({first}); check the repo id and your "
                      "connection (HF_HUB_OFFLINE), or pass local files")


def _cached_files(repo_id: str, revision: str | None, pattern: str | None) -> tuple[tuple[str, str], ...]:
    """Offline: the usable files of a revision already in the Hub cache (nothing is contacted)."""
    from huggingface_hub import snapshot_download

    for rev in [revision] if revision else ["main", CONVERTED_PARQUET_REVISION]:
        try:
            folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=rev, local_files_only=True))
        except Exception:  # not cached: try the next revision
            continue
        usable = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        usable = [p for p in usable if _usable(p, pattern)]
        if usable:
            return tuple((p, str(folder / p)) for p in usable)
    raise PizooError(f"--data {repo_id}: offline (HF_HUB_OFFLINE) and the dataset is not in the Hub cache; "
                     "connect once to download it, or pass local files")


def _hub_call(call, repo_id: str, endpoint: str, action: str, revision: str | None):
    """Run `call()` (Hub requests) with the bounded waits and network retries of every Hub call
    (hub_client.with_retries); what fails ends as one line naming --data."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    from .hub_client import with_retries

    answered: list[Exception] = []  # an answer, not a network failure: worded for --data, never retried

    def guarded():
        try:
            return call()
        except (OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError) as e:
            answered.append(e)
            raise

    try:
        return with_retries(guarded, action=action, repo_id=repo_id, endpoint=endpoint, token=get_token())
    except PizooError as e:
        if answered:
            raise _hub_error(repo_id, answered[-1], revision) from None
        raise PizooError(f"--data {repo_id}: {e}; or pass local files") from None


@functools.lru_cache(maxsize=16)
def hub_dataset_files(repo_id: str, revision: str | None = None, pattern: str | None = None) -> tuple[tuple[str, str], ...]:
    """(path in repo, local file) of the data files of a Hub dataset, downloaded into the Hub cache.

    The revision asked for (default main) is searched first; with no usable file there and no
    explicit revision, the Hub's automatic Parquet conversion (refs/convert/parquet) is used. Only
    the usable files (matching `pattern`) are downloaded; hf_hub_download resumes partial files.
    Every request has a bounded wait (hub_client.bound_hub_requests) and network failures are retried.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RevisionNotFoundError

    from .hub_client import bound_hub_requests, hub_endpoint, hub_offline

    if hub_offline():
        return _cached_files(repo_id, revision, pattern)
    bound_hub_requests()  # a Hub that never answers must not hang the run
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint)

    def listing(rev: str) -> list[str] | None:
        try:
            # dataset_info's siblings, not list_repo_files: the tree listing retries on its own
            # (http_backoff, minutes) where every other Hub call of pizoo is bounded by with_retries.
            return [s.rfilename for s in api.dataset_info(repo_id, revision=rev).siblings or []]
        except RevisionNotFoundError:
            if revision:
                raise
            return None  # no such branch (a dataset without a Parquet conversion): try the next

    for rev in [revision] if revision else ["main", CONVERTED_PARQUET_REVISION]:
        files = _hub_call(lambda: listing(rev), repo_id, endpoint, "list the files of the dataset", rev)
        usable = sorted(p for p in files or [] if _usable(p, pattern))
        if not usable:
            continue
        # By revision name, so the cache records the ref and an offline run finds the files again.
        return tuple((p, _hub_call(lambda: hf_hub_download(repo_id, p, repo_type="dataset", revision=rev,
                                                           endpoint=endpoint),
                                   repo_id, endpoint, "download the dataset", rev))
                     for p in usable)
    where = f"revision {revision}" if revision else f"main nor {CONVERTED_PARQUET_REVISION}"
    what = f" matching --data-files {pattern}" if pattern else ""
    raise PizooError(f"--data {repo_id}: no usable data file{what} in {where}; pizoo reads {SUPPORTED} "
                     "(pick files with --data-files, another revision with --data-revision)")
