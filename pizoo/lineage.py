"""A base model's public identity: what the Hub, the zoo and every exported file say a model comes from.

An identity is worked out once, when a base is resolved, from the best source available (pizoo.resolve
gathers them): an alias (its Hub id and license), a Hub id and revision, a zoo entry pulled from the
Hub, a GGUF file's own `general.*` keys (source repository, name, license, base models), the origin of
a GGUF an installed package ships, or a local HF folder's traces of the Hub (a Hub-cache snapshot
path, config.json's `_name_or_path`, the card's license). It is then recorded beside the local
sha256 of the weights in calibration.json, in config.json's `pizoo` block, in every export and in
the zoo, and it names every artifact (SmolLM2-135M-Instruct-32K-PI-F16.gguf).

A base with no public identity is "a local model" wherever a published file describes it: a user's
folder or file path never names a base outside this machine. `local_name` (a folder's or file's
name, never a path) only names artifacts.

This module is a leaf: it imports nothing of pizoo but errors, so every other module may use it.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_URL = "https://huggingface.co"
LOCAL_MODEL = "a local model"
# GGUF file types whose weights are exact floats; anything else was quantized.
FLOAT_TYPES = {"F32", "F16", "BF16", "ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"}
# A Hub repository URL: https://huggingface.co/ORG/NAME (optionally /tree/REV, /blob/...)
_HUB_REPO_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:/|$)")
# A Hub cache snapshot: .../models--ORG--NAME/snapshots/COMMIT
_HUB_CACHE = re.compile(r"^models--([A-Za-z0-9][\w.-]*?)--([A-Za-z0-9][\w.-]*)$")


@dataclass
class Identity:
    """Who a base model is in public, and how its weights reached pizoo."""

    hub_id: str | None = None  # ORG/NAME on the Hub
    name: str | None = None  # public name: the Hub repo's name, or the name the GGUF file declares
    organization: str | None = None
    revision: str | None = None  # the Hub commit (or branch) the weights came from
    license: str | None = None  # the Hub license identifier (apache-2.0, llama3, other)
    quantization: str | None = None  # Q4_1 ...: the weights were dequantized from a quantized GGUF
    source: str = "local"  # alias | hub | zoo | gguf | packaged | folder | local: where this was learnt
    local_name: str | None = None  # the base folder's or file's name (never a path): names artifacts only

    @property
    def public(self) -> bool:
        return bool(self.hub_id or self.name)

    @property
    def repo_url(self) -> str | None:
        return f"{HUB_URL}/{self.hub_id}" if self.hub_id else None

    @property
    def label(self) -> str:
        """How published text names the base: its Hub id, its public name, or "a local model"."""
        return self.hub_id or self.name or LOCAL_MODEL

    @property
    def file_name(self) -> str:
        """The name artifacts are built from: the public name, else the local one, else "model"."""
        return _file_safe(self.name or self.local_name or "model")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> "Identity | None":
        if not isinstance(data, dict):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and (v is None or isinstance(v, str))})

    def filled_from(self, other: "Identity | None") -> "Identity":
        """This identity with its unknown fields taken from `other` (a weaker source)."""
        if other is None:
            return self
        mine = asdict(self)
        for k, v in asdict(other).items():
            if mine.get(k) is None and v is not None:
                mine[k] = v
        return Identity(**mine)


def _file_safe(name: str) -> str:
    return re.sub(r"[^\w.+-]", "-", name.strip()).strip("-.") or "model"


def is_hub_id(value: Any) -> bool:
    """ORG/NAME that is not a path on this machine (a relative folder can look like a Hub id)."""
    return isinstance(value, str) and bool(HUB_ID.match(value)) and not Path(value).expanduser().exists()


def from_hub(hub_id: str, *, revision: str | None = None, license: str | None = None, source: str = "hub",
             quantization: str | None = None) -> Identity:
    org, _, name = hub_id.partition("/")
    return Identity(hub_id=hub_id, name=name, organization=org, revision=revision, license=license,
                    quantization=quantization, source=source)


def hub_id_from_url(url: Any) -> str | None:
    m = _HUB_REPO_URL.match(url) if isinstance(url, str) else None
    return m.group(1) if m else None


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def quantization_of(file_type: str | None) -> str | None:
    """A GGUF file type label (Q4_1, F16, ...) -> the label when it is a quantization, else None."""
    if not file_type:
        return None
    label = file_type.removeprefix("MOSTLY_").removeprefix("ALL_")
    return None if label in FLOAT_TYPES else label


def from_gguf_general(general: dict[str, Any], *, file_type: str | None = None,
                      local_name: str | None = None) -> Identity:
    """The identity of the model inside a GGUF file, from its general.* keys (given without the
    "general." prefix: name, basename, size_label, finetune, organization, license,
    source.huggingface.repository, source.url, base_model.N.name / .organization / .repo_url).

    The file's own source repository is the best evidence. `base_model.*` lists the model's parents:
    a base whose name is the file's own (or the only one, when the file names nothing) is the model
    the file was converted from; a parent with another name (the instruct model's pretrained base)
    is not this model.
    """
    def text(key: str) -> str | None:
        v = general.get(key)
        return v.strip() if isinstance(v, str) and v.strip() else None

    lic = text("license")
    quant = quantization_of(file_type)
    hub_id = text("source.huggingface.repository") or hub_id_from_url(text("source.url"))
    if hub_id and HUB_ID.match(hub_id):
        ident = from_hub(hub_id, license=lic, source="gguf", quantization=quant)
        return ident.filled_from(Identity(local_name=local_name))
    parts = [text(k) for k in ("basename", "size_label", "finetune")]
    own = text("name") or ("-".join(p for p in parts if p) if parts[0] else None)
    bases = []
    for i in range(int(general.get("base_model.count") or 0) or 8):
        entry = {k: text(f"base_model.{i}.{k}") for k in ("name", "organization", "repo_url")}
        if any(entry.values()):
            bases.append(entry)
    for b in bases:
        if b["name"] and (own is None or _norm(b["name"]) == _norm(own)):
            repo = hub_id_from_url(b["repo_url"])
            if repo:
                return from_hub(repo, license=lic, source="gguf", quantization=quant).filled_from(
                    Identity(local_name=local_name))
            own = own or b["name"]
            return Identity(name=own.replace(" ", "-"), organization=b["organization"] or text("organization"),
                            license=lic, quantization=quant, source="gguf", local_name=local_name)
    if own:
        return Identity(name=own.replace(" ", "-"), organization=text("organization"), license=lic,
                        quantization=quant, source="gguf", local_name=local_name)
    return Identity(license=lic, quantization=quant, source="local", local_name=local_name)


def from_hub_cache_path(folder: Path) -> Identity | None:
    """A folder inside the Hugging Face cache (…/models--ORG--NAME/snapshots/COMMIT) names its repo."""
    resolved = folder.resolve()
    for parent in (resolved.parent.parent,) if resolved.parent.name == "snapshots" else ():
        m = _HUB_CACHE.match(parent.name)
        if m:
            return from_hub(f"{m.group(1)}/{m.group(2)}", revision=resolved.name, source="folder")
    return None


def from_folder_config(folder: Path, config: dict[str, Any]) -> Identity:
    """What an HF folder's own files say: an identity pizoo recorded (the one resolve knew when it
    imported a GGUF, else the imported GGUF's general.* keys), a Hub-cache snapshot path, or config.json's
    `_name_or_path` when it is a Hub id. Otherwise a local model named by its folder."""
    block = config.get("pizoo") if isinstance(config.get("pizoo"), dict) else {}
    local_name = folder.resolve().name
    recorded = Identity.from_dict(block.get("identity"))  # what resolve knew when it imported a GGUF
    if recorded is not None and recorded.public:
        return recorded
    general = block.get("gguf_general")
    if isinstance(general, dict):
        stem = block.get("source_gguf")
        ident = from_gguf_general(general, file_type=general.get("file_type"),
                                  local_name=Path(stem).stem if isinstance(stem, str) else local_name)
        if ident.public:
            return ident
        local_name = ident.local_name or local_name
    cached = from_hub_cache_path(folder)
    if cached is not None:
        return cached
    name_or_path = config.get("_name_or_path")
    if is_hub_id(name_or_path):
        return from_hub(name_or_path, source="folder")
    return Identity(source="local", local_name=local_name)


def base_identity(config: dict[str, Any], calibration: dict[str, Any] | None) -> Identity:
    """The base of an extended model, from its records: calibration.json's base_model.identity,
    config.json's pizoo.base_identity, then (records from before identities) a Hub id in either.
    Never a path: a base recorded only by a local path or name is "a local model"."""
    base = (calibration or {}).get("base_model")
    base = base if isinstance(base, dict) else {}
    block = config.get("pizoo") if isinstance(config.get("pizoo"), dict) else {}
    for recorded in (base.get("identity"), block.get("base_identity")):
        ident = Identity.from_dict(recorded)
        if ident is not None:
            return ident
    for candidate in (base.get("hub_id"), block.get("base_model")):
        if is_hub_id(candidate):
            return from_hub(candidate, revision=base.get("revision"))
    spec = base.get("spec") or block.get("base_model")
    local = Path(spec).name if isinstance(spec, str) and spec else None
    return Identity(source="local", local_name=local)


def model_identity(config: dict[str, Any], folder: Path | None = None) -> Identity:
    """The identity that names a folder's artifacts: an extended model's base, else the model's own."""
    block = config.get("pizoo") if isinstance(config.get("pizoo"), dict) else {}
    if block.get("base_identity") or block.get("base_model"):
        return base_identity(config, None)
    return from_folder_config(folder, config) if folder is not None else Identity()


# --------------------------------------------------------------------------------------------
# Names


def split_size(name: str, size_label: str) -> tuple[str, str]:
    """("SmolLM2", "Instruct") for ("SmolLM2-135M-Instruct", "135M"); (name, "") when the size is absent."""
    m = re.search(rf"[-_. ]?{re.escape(size_label)}(?![0-9A-Za-z])", name, flags=re.IGNORECASE)
    if not m:
        return name, ""
    return name[:m.start()] or name, name[m.end():].strip("-_. ")


def artifact_stem(ident: Identity, extension: list[str]) -> str:
    """The one name of an artifact: the base's public name as it is (else its local name), then the
    extension's labels: SmolLM2-135M-Instruct-32K-PI."""
    return _file_safe("-".join([ident.file_name, *extension]))


# --------------------------------------------------------------------------------------------
# Nothing local leaves the machine


def local_roots(*extra: str | os.PathLike | None) -> list[str]:
    """The user's absolute folders that no published byte may contain: home, PIZOO_HOME, the working
    folder, plus `extra` (the release folder). Each in its given and its resolved spelling; the
    filesystem root and one-component paths shorter than 4 characters are left out (they match anything)."""
    candidates: list[str | os.PathLike | None] = [os.environ.get("HOME"), os.environ.get("PIZOO_HOME"), os.getcwd(),
                                                   *extra]
    try:
        candidates.append(str(Path.home()))
    except RuntimeError:
        pass
    roots: set[str] = set()
    for c in candidates:
        if not c:
            continue
        p = Path(c).expanduser()
        if not p.is_absolute():
            continue
        for spelling in {str(p), str(p.resolve())}:
            spelling = spelling.rstrip("/")
            if spelling and len(spelling) >= 4:
                roots.add(spelling)
    return sorted(roots, key=len, reverse=True)


def find_local_path(text: str, roots: list[str], *, inside_only: bool = False) -> str | None:
    """The first root that `text` holds as a path (the root itself, or something inside it), else None.
    A root counts only at a path boundary (/home/al does not match /home/alice). With `inside_only`
    (vocabularies, whose tokens can be short strings like "/root"), only paths inside a root count."""
    for root in roots:
        start = text.find(root)
        while start >= 0:
            end = start + len(root)
            nxt = text[end:end + 1]
            before = text[start - 1:start] if start else ""
            if before != "/" and before not in _PATH_CHARS:
                if nxt == "/" or (not inside_only and (nxt == "" or nxt not in _PATH_CHARS)):
                    return root
            start = text.find(root, start + 1)
    return None


_PATH_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+@~")


def card_license(readme: Path) -> str | None:
    """The `license:` of a model card's YAML front matter, if the file has one."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None
