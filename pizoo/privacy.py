"""Nothing local leaves: every file a push would send is searched for the user's absolute folders.

The folders (pizoo.lineage.local_roots): the home folder, PIZOO_HOME, the working folder and the
release folder. Each file is read the way its format stores text, so that a finding names the key:
JSON records and configs key by key (vocabulary keys too), GGUF metadata strings and string arrays,
the `__metadata__` of safetensors headers, text files line by line, other files byte by byte.
Vocabularies (tokenizer.json's model, GGUF tokens and merges, binary tokenizer models) count only
paths inside a folder, because a token may be a short string like "/root" by itself.

A finding is one PizooError line naming the file, the key and the folder: nothing is uploaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .errors import PizooError
from .lineage import find_local_path

TEXT_SUFFIXES = {".md", ".txt", ".jinja", ".yaml", ".yml", ".toml", ".py", ".csv", ".tsv", ".cfg", ".ini"}
# Keys whose strings are vocabulary entries, not metadata.
VOCAB_PARTS = {"vocab", "merges", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"}


def _walk_json(value: Any, key: str = "") -> Iterator[tuple[str, str, bool]]:
    """(key path, string, is vocabulary) for every string in a JSON value, dictionary keys included."""
    vocab = any(part.split("[")[0] in VOCAB_PARTS for part in key.split("."))
    if isinstance(value, str):
        yield key or "(value)", value, vocab
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_json(v, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            sub = f"{key}.{k}" if key else str(k)
            yield f"{sub} (the key)", str(k), vocab
            yield from _walk_json(v, sub)


def _json_strings(data: bytes, name: str) -> Iterator[tuple[str, str, bool]] | None:
    try:
        if name.endswith(".jsonl"):
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
            return (item for i, row in enumerate(rows) for item in _walk_json(row, f"line {i + 1}"))
        return _walk_json(json.loads(data))
    except (UnicodeDecodeError, ValueError):
        return None


def _gguf_strings(path: Path) -> Iterator[tuple[str, str, bool]]:
    from .export.gguf import field, open_gguf

    reader = open_gguf(path)
    for key in reader.fields:
        value = field(reader, key)
        vocab = key in VOCAB_PARTS
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, str):
                yield f"metadata key {key}", item, vocab


def _safetensors_strings(data: bytes) -> Iterator[tuple[str, str, bool]]:
    if len(data) < 8:
        return
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError):
        return
    for key, value, _ in _walk_json(header.get("__metadata__") or {}, "__metadata__"):
        yield f"header {key}", value, False


def _text_strings(text: str) -> Iterator[tuple[str, str, bool]]:
    for i, line in enumerate(text.splitlines(), 1):
        yield f"line {i}", line, False


def local_path_in(name: str, roots: list[str], *, source: Path | None = None,
                  content: bytes | None = None) -> tuple[str, str] | None:
    """(where, folder) for the first of the user's folders found in a file to publish, else None.
    `name` is its path in the repo (it picks the reader); the bytes are `content` or `source`'s."""
    suffix = Path(name).suffix.lower()
    structured = suffix in (".json", ".jsonl", ".safetensors") or suffix in TEXT_SUFFIXES or name == "README.md"
    if content is None and source is not None and suffix == ".gguf":
        strings: Any = _gguf_strings(source)
    elif content is None and source is not None and not structured:
        return _bytes_hit(source, roots)
    else:
        if content is None:
            if source is None:
                return None
            if suffix == ".safetensors":  # only the header: the tensors are numbers
                with open(source, "rb") as f:
                    head = f.read(8)
                    content = head + f.read(int.from_bytes(head, "little")) if len(head) == 8 else head
            else:
                content = source.read_bytes()
        strings = None
        if suffix in (".json", ".jsonl"):
            strings = _json_strings(content, name)
        elif suffix == ".safetensors":
            strings = _safetensors_strings(content)
        else:
            try:
                strings = _text_strings(content.decode("utf-8"))
            except UnicodeDecodeError:
                strings = None
        if strings is None:  # not what its name says: searched as bytes
            raw = content.decode("latin-1")
            hit = find_local_path(raw, roots, inside_only=True)
            return (f"bytes at offset {raw.find(hit)}", hit) if hit else None
    for where, text, vocab in strings:
        hit = find_local_path(text, roots, inside_only=vocab)
        if hit:
            return where, hit
    return None


def _bytes_hit(source: Path, roots: list[str], chunk: int = 16 << 20) -> tuple[str, str] | None:
    """A path inside one of `roots` in a binary file, read in chunks (the file may be gigabytes)."""
    overlap = max((len(r) for r in roots), default=0) + 1
    offset, tail = 0, ""
    with open(source, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return None
            text = tail + block.decode("latin-1")  # one char per byte: offsets are byte offsets
            hit = find_local_path(text, roots, inside_only=True)
            if hit:
                return f"bytes at offset {offset - len(tail) + text.find(hit)}", hit
            tail = text[-overlap:]
            offset += len(block)


def check_publishable(files: list[tuple[str, Path | None, bytes | None]], roots: list[str]) -> None:
    """Raise one PizooError line for the first file (path in repo, local source, generated bytes) that
    holds one of `roots`; return when none does."""
    for name, source, content in files:
        found = local_path_in(name, roots, source=source, content=content)
        if found:
            where, root = found
            origin = f" ({source})" if source is not None else ""
            raise PizooError(f"{name}{origin}: {where} contains the local folder {root}; pizoo never publishes "
                             "this machine's paths: remove it from the file (or move the file out of that folder's "
                             "records) and push again")
