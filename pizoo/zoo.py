"""The local model zoo: one place that knows every base and extended model pizoo has made or pulled.

Layout under `pizoo_home()` (PIZOO_HOME, default ~/.cache/pizoo):

    zoo.json        {"version": 1, "entries": {NAME: manifest}, "aliases": {NAME: alias}}
    zoo.lock        the lock (fsutil.hold_lock) every writer holds while it reads, changes and replaces
                    zoo.json; a writer waits for it up to LOCK_WAIT_S, then stops with one line naming the holder
    models/         folders pulled from the Hub (owned by the zoo: `pizoo zoo rm` deletes them)
    downloads/      resumable partial pulls (snapshot_download's local_dir before the final rename)

A manifest records one artifact: where it is, its lineage (base id and revision or sha256), the
recipe, data fingerprint, steps, evaluation results, every format with its files, sizes and sha256,
and where it was published. zoo.json is replaced atomically (write, fsync, rename) under an exclusive
lock, so two pizoo processes registering at once both keep their entries and a crash never leaves a
half-written index. Readers need no lock: they always see a complete file.

Artifact folders come in two layouts, both understood by `locate_artifact`:
- a release folder from `pizoo extend`: hf/, gguf/*.gguf, trtllm/, eval/eval.json + eval/ppl.png;
- a flat HF folder (what `pizoo pull` gives): HF files at the root, *.gguf beside them, trtllm/,
  eval/ (or eval.json at the root).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .errors import PizooError
from .fsutil import atomic_write_json, hold_lock, read_json, sha256_file, writing
from .lineage import HUB_ID, base_identity, card_license

ZOO_VERSION = 1
LOCK_WAIT_S = 60.0  # an index update takes milliseconds: a longer wait means a stuck process
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@/+-]{0,199}$")
# Folders inside an HF folder that are other formats, bookkeeping or download state, not HF files.
NOT_HF = {"trtllm", "eval", "gguf", "hf", ".cache", ".git"}

Manifest = dict[str, Any]


def pizoo_home() -> Path:
    """PIZOO_HOME, or the platform cache folder (~/.cache/pizoo)."""
    env = os.environ.get("PIZOO_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pizoo"


# --------------------------------------------------------------------------------------------
# Artifact folders


@dataclass
class Artifact:
    """The parts of an artifact folder, whichever layout it has."""

    root: Path
    hf_dir: Path
    gguf_files: list[Path] = field(default_factory=list)
    trtllm_dir: Path | None = None
    eval_json: Path | None = None
    plot: Path | None = None
    run_json: Path | None = None

    def hf_files(self) -> list[Path]:
        """Every file of the HF model (nested ones too), without other formats or bookkeeping."""
        out = []
        for path in sorted(self.hf_dir.rglob("*")):
            rel = path.relative_to(self.hf_dir)
            if not path.is_file() or rel.parts[0] in NOT_HF or rel.name.startswith("."):
                continue
            if path.suffix.lower() == ".gguf":
                continue
            out.append(path)
        return out

    def trtllm_files(self) -> list[Path]:
        if self.trtllm_dir is None:
            return []
        return sorted(p for p in self.trtllm_dir.rglob("*") if p.is_file() and not p.name.startswith("."))

    def eval_files(self) -> list[Path]:
        return [p for p in (self.eval_json, self.plot) if p is not None]


def locate_artifact(folder: str | os.PathLike) -> Artifact:
    """Find the HF model, GGUF files, TensorRT-LLM checkpoint and evaluation in a folder."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PizooError(f"{root}: not a folder; give a release folder from `pizoo extend` or an HF model folder")
    if (root / "hf" / "config.json").is_file():
        hf_dir = root / "hf"
        ggufs = sorted((root / "gguf").glob("*.gguf")) if (root / "gguf").is_dir() else []
        ggufs += sorted(root.glob("*.gguf"))
    elif (root / "config.json").is_file():
        hf_dir = root
        ggufs = sorted(root.glob("*.gguf"))
    else:
        raise PizooError(f"{root}: no config.json here nor in {root / 'hf'}; give a release folder from "
                         "`pizoo extend` or an HF model folder")
    trtllm = root / "trtllm"
    trtllm_dir = trtllm if (trtllm / "config.json").is_file() else None
    eval_json = next((p for p in (root / "eval" / "eval.json", root / "eval.json", hf_dir / "eval.json")
                      if p.is_file()), None)
    plot = None
    if eval_json is not None:
        plot = next((p for p in (eval_json.parent / "ppl.png", root / "ppl.png") if p.is_file()), None)
    run_json = root / "run.json" if (root / "run.json").is_file() else None
    return Artifact(root=root, hf_dir=hf_dir, gguf_files=ggufs, trtllm_dir=trtllm_dir, eval_json=eval_json,
                    plot=plot, run_json=run_json)


def _file_records(root: Path, files: list[Path], previous: dict[str, dict]) -> list[dict]:
    """size + sha256 per file; a file whose size and mtime match the previous manifest keeps its hash
    (re-registering after a push must not re-hash a 14 GB model), `verify` always re-hashes."""
    records = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        st = path.stat()
        old = previous.get(rel)
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            digest = old["sha256"]
        else:
            digest = sha256_file(path)
        records.append({"path": rel, "size": st.st_size, "sha256": digest, "mtime_ns": st.st_mtime_ns})
    return records


def _format(files: list[dict], path: str | None = None) -> dict:
    return {"path": path, "files": files, "bytes": sum(f["size"] for f in files)}


def build_entry(folder: str | os.PathLike, *, name: str | None = None, source: str = "local",
                hub: dict | None = None, previous: Manifest | None = None) -> Manifest:
    """The manifest of an artifact folder: lineage, recipe, data, steps, eval results and formats.

    `source` is "local" (made here, e.g. by `pizoo extend`) or "hub" (pulled); `hub` records the
    origin of a pulled model: {repo_id, revision, commit, endpoint}.
    """
    art = locate_artifact(folder)
    root = art.root.resolve()
    config = read_json(art.hf_dir / "config.json", "config.json")
    block = config.get("pizoo") or {}
    calib_path = art.hf_dir / "calibration.json"
    calib = read_json(calib_path, "calibration.json") if calib_path.is_file() else {}
    evaluation = read_json(art.eval_json, "eval.json") if art.eval_json else None
    old_files = {f["path"]: f for fmt in (previous or {}).get("formats", {}).values() for f in fmt.get("files", [])}

    def records(files: list[Path]) -> list[dict]:
        return _file_records(root, [p.resolve() for p in files], old_files)

    formats: dict[str, dict] = {
        "hf": _format(records(art.hf_files()), art.hf_dir.resolve().relative_to(root).as_posix())}
    if art.gguf_files:
        formats["gguf"] = _format(records(art.gguf_files))
    if art.trtllm_dir is not None:
        formats["trtllm"] = _format(records(art.trtllm_files()), art.trtllm_dir.resolve().relative_to(root).as_posix())
    if art.eval_files():
        formats["eval"] = _format(records(art.eval_files()))

    base = calib.get("base_model") or {}
    recipe = calib.get("recipe") or block.get("recipe")
    if isinstance(recipe, str):
        recipe = {"name": recipe}
    extended = bool(calib or block.get("rope_method") not in (None, "none"))
    lineage: dict[str, Any] = {}
    if extended:
        # The base by its public identity (never a path), beside the sha256 of the bytes used.
        ident = base_identity(config, calib)
        lineage = {"base_model": ident.label, "base_identity": ident.to_dict(),
                   "base_revision": ident.revision or base.get("revision"), "base_sha256": base.get("sha256"),
                   "base_spec": base.get("spec")}
    elif hub:
        lineage = {"base_model": hub.get("repo_id"), "base_revision": hub.get("commit"), "base_sha256": None}
    data = calib.get("data") or {}
    entry: Manifest = {
        "name": name or default_name(root, hub),
        "kind": "extended" if extended else "base",
        "source": source,
        "path": str(root),
        "hub": hub,
        "published": list((previous or {}).get("published", [])),
        "architecture": (config.get("model_type") or ""),
        "lineage": lineage,
        "method": calib.get("method") or block.get("rope_method"),
        "factor": calib.get("factor"),
        "context": calib.get("ctx") or block.get("target_context") or config.get("max_position_embeddings"),
        "original_context": calib.get("original_context"),
        "recipe": recipe,
        "data_fingerprint": data.get("fingerprint"),
        "data": data or None,
        "steps": calib.get("steps"),
        "tokens": calib.get("tokens"),
        "final_loss": calib.get("final_loss"),
        "eval": _eval_summary(evaluation),
        "formats": formats,
        "created": (previous or {}).get("created") or _now(),
        "updated": _now(),
        "pizoo_version": __version__,
    }
    return entry


def _eval_summary(evaluation: dict | None) -> dict | None:
    if evaluation is None:
        return None
    gate = evaluation.get("gate") or {}
    passkey = evaluation.get("passkey") or {}
    return {"results": [{k: r.get(k) for k in ("ctx", "ppl", "tokens", "documents", "stride") if k in r}
                        for r in evaluation.get("results") or []],
            "passkey_k_max": passkey.get("k_max"),
            "gate_passed": gate.get("passed"),
            "gate_reasons": gate.get("reasons")}


def default_name(root: Path, hub: dict | None = None) -> str:
    """A pulled model is named by its Hub id (@revision when not main); a local one by its folder."""
    if hub:
        rev = hub.get("revision")
        return hub["repo_id"] + (f"@{rev}" if rev and rev != "main" else "")
    return root.name


def _free_name(entries: dict, name: str, path: str) -> str:
    """`name`, or `name-2`, `name-3`, ... when another folder already holds it."""
    candidate, n = name, 1
    while candidate in entries and entries[candidate]["path"] != path:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------------
# Aliases


def shipped_aliases() -> dict[str, dict]:
    """The aliases in pizoo/resources/aliases.toml: {name: {hub_id, architecture, context, license}},
    plus `also` and a `shape` table for the bases the planner knows without a download."""
    text = resources.files("pizoo").joinpath("resources/aliases.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


# --------------------------------------------------------------------------------------------
# The zoo


@dataclass
class VerifyReport:
    name: str
    checked: int
    problems: list[str]  # one line per missing or changed file

    @property
    def ok(self) -> bool:
        return not self.problems


class Zoo:
    """The zoo index under `home` (default pizoo_home()). Every mutation is locked and atomic."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home).expanduser() if home is not None else pizoo_home()
        self.index_path = self.home / "zoo.json"
        self.lock_path = self.home / "zoo.lock"

    # --- storage ----------------------------------------------------------------------------
    def _read(self) -> dict:
        if not self.index_path.is_file():
            return {"version": ZOO_VERSION, "entries": {}, "aliases": {}}
        state = read_json(self.index_path, "zoo index")
        if not isinstance(state.get("entries"), dict) or not isinstance(state.get("aliases", {}), dict):
            raise PizooError(f"{self.index_path}: not a pizoo zoo index (no 'entries' object); move it aside "
                             "and re-register your models")
        state.setdefault("aliases", {})
        return state

    @contextlib.contextmanager
    def _update(self) -> Iterator[dict]:
        """Hold the exclusive lock, yield the current index, then replace zoo.json atomically."""
        with hold_lock(self.lock_path, self.index_path, wait=LOCK_WAIT_S,
                       advice=f"it did not finish within {LOCK_WAIT_S:.0f} s; retry when it has"):
            state = self._read()
            yield state
            atomic_write_json(self.index_path, state)

    def check_writable(self) -> None:
        """One line now, rather than at the end of a long run that registers its result: PIZOO_HOME
        (or, while it does not exist, the folder it will be made in) is a file, read-only or not ours
        to write. Creates nothing."""
        import errno

        existing = next(p for p in (self.home, *self.home.parents) if os.path.lexists(p))
        with writing(self.index_path if existing == self.home else self.home):
            if not existing.is_dir():
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
            if not os.access(existing, os.W_OK):
                code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
                raise OSError(code, os.strerror(code), str(existing))

    # --- entries ----------------------------------------------------------------------------
    def register(self, entry: Manifest, *, free_name: bool = False) -> Manifest:
        """Add or replace the entry with entry["name"]; with `free_name`, a name another folder holds
        becomes name-2, name-3, ... (chosen under the lock, so two processes never take the same one).
        Publications recorded on the entry since it was built are kept."""
        name = entry.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise PizooError(f"zoo entry name {name!r}: use letters, digits and . _ - @ / + (at most 200 characters)")
        for key in ("path", "formats"):
            if key not in entry:
                raise PizooError(f"zoo entry '{name}': missing '{key}'; build entries with pizoo.zoo.build_entry")
        with self._update() as state:
            entries = state["entries"]
            if free_name:
                entry["name"] = name = _free_name(entries, name, entry["path"])
            current = entries.get(name)
            if current is not None and current.get("path") == entry["path"]:
                published = entry.setdefault("published", [])
                published += [p for p in current.get("published") or [] if p not in published]
            entries[name] = entry
        return entry

    def register_folder(self, folder: str | os.PathLike, *, name: str | None = None, source: str = "local",
                        hub: dict | None = None) -> Manifest:
        """Build the manifest of a folder and register it (keeping the publications of an earlier entry)."""
        root = Path(folder).expanduser().resolve()
        previous = self.find_by_path(root)
        if name is None and previous is not None:
            name = previous["name"]
        if name is not None and previous is None:
            previous = self.find(name)
            if previous is not None and Path(previous["path"]) != root:
                previous = None
        entry = build_entry(root, name=name, source=source, hub=hub, previous=previous)
        return self.register(entry, free_name=name is None)

    def record_publication(self, folder: str | os.PathLike, publication: dict) -> Manifest:
        """Register `folder` if needed and append a publication {repo_id, revision, commit, url, ...};
        the same commit of the same repo and revision is recorded once (a repeated push makes none)."""
        entry = self.register_folder(folder)
        key = lambda p: (p.get("repo_id"), p.get("revision"), p.get("commit"))  # noqa: E731
        with self._update() as state:
            current = state["entries"][entry["name"]]
            published = current.setdefault("published", [])
            if not any(key(p) == key(publication) for p in published):
                published.append({**publication, "time": _now()})
            entry = current
        return entry

    def find(self, name: str) -> Manifest | None:
        return self._read()["entries"].get(name)

    def find_by_path(self, path: str | os.PathLike) -> Manifest | None:
        root = str(Path(path).expanduser().resolve())
        return next((e for e in self._read()["entries"].values() if e.get("path") == root), None)

    def find_by_hub(self, repo_id: str, revision: str | None = None) -> Manifest | None:
        """The pulled entry of a Hub repo (at `revision` when given, else the newest pull)."""
        hits = [e for e in self._read()["entries"].values()
                if (e.get("hub") or {}).get("repo_id") == repo_id
                and (revision is None or revision in ((e["hub"].get("revision") or "main"), e["hub"].get("commit")))]
        return max(hits, key=lambda e: e.get("updated", ""), default=None)

    def get(self, name: str) -> Manifest:
        entry = self.find(name)
        if entry is None:
            known = sorted(self._read()["entries"])
            hint = f"known: {', '.join(known[:10])}{', ...' if len(known) > 10 else ''}" if known else "the zoo is empty"
            raise PizooError(f"zoo: no entry named '{name}' ({hint}); see `pizoo zoo list`")
        return entry

    def list(self) -> list[Manifest]:
        entries = self._read()["entries"]
        return [entries[k] for k in sorted(entries)]

    def verify(self, name: str) -> VerifyReport:
        """Re-hash every file of every format and compare with the manifest."""
        entry = self.get(name)
        root = Path(entry["path"])
        problems, checked = [], 0
        for fmt, info in entry.get("formats", {}).items():
            for rec in info.get("files", []):
                path = root / rec["path"]
                checked += 1
                if not path.is_file():
                    problems.append(f"{fmt}: {path}: missing")
                    continue
                size = path.stat().st_size
                if size != rec["size"]:
                    problems.append(f"{fmt}: {path}: size {size} != {rec['size']} in the manifest")
                    continue
                digest = sha256_file(path)
                if digest != rec["sha256"]:
                    problems.append(f"{fmt}: {path}: sha256 {digest[:16]}... != {rec['sha256'][:16]}... in the manifest")
        return VerifyReport(name=name, checked=checked, problems=problems)

    def owns(self, entry: Manifest) -> bool:
        """Whether the entry's files live inside the zoo (pulled models) rather than in a user folder."""
        root = Path(entry["path"]).resolve()
        return root.is_relative_to((self.home / "models").resolve())

    def remove(self, name: str) -> tuple[Manifest, bool]:
        """Unregister `name`; delete its files only when the zoo owns them. Returns (entry, deleted)."""
        with self._update() as state:
            if name not in state["entries"]:
                self.get(name)  # raises the helpful error
            entry = state["entries"].pop(name)
        deleted = False
        if self.owns(entry) and Path(entry["path"]).exists():
            shutil.rmtree(entry["path"])
            deleted = True
        return entry, deleted

    def disk_usage(self) -> dict:
        """Bytes per entry (from the manifests) and what the zoo folder itself holds on disk."""
        entries = {e["name"]: sum(f.get("bytes", 0) for f in e.get("formats", {}).values()) for e in self.list()}
        on_disk = {}
        for sub in ("models", "downloads", "imports"):
            d = self.home / sub
            on_disk[sub] = sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0
        return {"home": str(self.home), "entries": entries, "entries_total": sum(entries.values()),
                "home_on_disk": on_disk, "home_total": sum(on_disk.values())}

    # --- aliases ----------------------------------------------------------------------------
    def aliases(self) -> dict[str, dict]:
        """Shipped aliases overlaid with the user's (a user alias wins)."""
        merged = {k: {**v, "origin": "shipped"} for k, v in shipped_aliases().items()}
        merged.update({k: {**v, "origin": "user"} for k, v in self._read()["aliases"].items()})
        return merged

    def add_alias(self, name: str, hub_id: str, *, architecture: str | None = None,
                  context: int | None = None, license: str | None = None,
                  gguf: str | os.PathLike | None = None) -> dict:
        """`gguf`: a GGUF file on this machine made from `hub_id` (e.g. a quantized download); the
        alias then resolves to it offline, with the Hub id and license as the base's identity."""
        if not NAME.match(name) or "/" in name:
            raise PizooError(f"alias name '{name}': use letters, digits and . _ - (no '/')")
        if not HUB_ID.match(hub_id):
            raise PizooError(f"alias '{name}': '{hub_id}' is not a Hub id; expected NAMESPACE/NAME")
        _check_alias_facts(architecture, context)
        if gguf is not None:
            gguf = Path(gguf).expanduser().resolve()
            if not gguf.is_file() or gguf.suffix.lower() != ".gguf":
                raise PizooError(f"--gguf {gguf}: not a .gguf file")
        alias = {"hub_id": hub_id, "architecture": architecture, "context": context, "license": license,
                 "gguf": str(gguf) if gguf is not None else None}
        alias = {k: v for k, v in alias.items() if v is not None}
        with self._update() as state:
            state["aliases"][name] = alias
        return alias


def _check_alias_facts(architecture: str | None, context: int | None) -> None:
    """An alias's facts feed the planner and the cards: refuse what no model can have."""
    from .families import FAMILIES
    from .options import check_context

    known = list(FAMILIES)
    if architecture is not None and architecture not in known:
        raise PizooError(f"--architecture {architecture}: not an architecture pizoo knows; use one of {', '.join(known)}")
    if context is not None:
        check_context(context, "--context")


def register_release(folder: str | os.PathLike, *, name: str | None = None, base: str | None = None) -> Manifest:
    """Register a release folder written by `pizoo extend`; `base` is the model the user named,
    kept in the lineage when calibration.json does not record it."""
    zoo = Zoo()
    entry = zoo.register_folder(folder, name=name)
    if base and not (entry.get("lineage") or {}).get("base_spec"):
        entry.setdefault("lineage", {})["base_spec"] = base
        entry["lineage"]["base_model"] = entry["lineage"].get("base_model") or base
        zoo.register(entry)
    return entry


# --------------------------------------------------------------------------------------------
# Aliases for pizoo.resolve and pizoo.plan


def alias_hub_id(spec: str) -> str | None:
    """The Hub id an alias names (user aliases first, then shipped; case-insensitive), else None."""
    hit = alias_info(spec)
    return hit["hub_id"] if hit else None


def alias_info(spec: str) -> dict | None:
    aliases = Zoo().aliases()
    return aliases.get(spec) or next((v for k, v in aliases.items() if k.lower() == spec.lower()), None)


def license_for(hub_id: str | None, folder: Path | None = None) -> str | None:
    """A Hub model's license: its card's YAML in `folder`, else an alias (shipped or the user's) naming it."""
    if folder is not None:
        found = card_license(folder / "README.md")
        if found:
            return found
    if not hub_id:
        return None
    key = hub_id.lower()
    for info in Zoo().aliases().values():
        ids = [info.get("hub_id"), *(info.get("also") or [])]
        if key in (str(i).lower() for i in ids if i) and info.get("license"):
            return info["license"]
    return None
