"""Publish to and pull from the Hugging Face Hub through huggingface_hub (`pizoo push`, `pizoo pull`).

push: one commit holding the HF files at the repo root, the GGUF files at the root named
`Base-32K-PI-Q8_0.gguf`, the TensorRT-LLM checkpoint under trtllm/, the evaluation (eval/eval.json,
eval/ppl.png) and the model card (README.md). Large files take the client's LFS path, and the LFS
batch endpoint skips objects the Hub already holds, so a push that failed half-way only uploads what
is missing when it is run again. A model whose evaluation gate failed or never ran is refused unless
`force`, which the card then states.

pull: snapshot_download (resumable: partial files stay in the zoo's downloads/ folder) into the
zoo, then one rename into models/ and a zoo entry.

Every request is bounded and retried (pizoo.hub_client: PIZOO_HUB_TIMEOUT, PIZOO_HUB_RETRIES), then
pizoo stops with one line.

The endpoint comes from HF_ENDPOINT, the token from the argument, HF_TOKEN or the saved login,
all read at call time. The token is only handed to huggingface_hub: it is never printed, logged,
written into a card or a manifest, and any error text is scrubbed of it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .card import (CardFacts, context_of, failing_reasons, method_of, read_card_license, render_card,
                   reproduce_command)
from .errors import GateFailed, PizooError
from .fsutil import output_lock, read_json, replace_dir
from .hub_client import LOGIN_HINT, bound_hub_requests, hub_endpoint, hub_offline, with_retries
from .lineage import HUB_ID, Identity, base_identity, find_local_path, local_roots
from .zoo import Artifact, Zoo, alias_info, default_name, license_for, locate_artifact, pizoo_home

PULL_WAIT_S = 3600.0  # another process downloading the same repo: wait for it rather than fetch twice


def check_repo_id(repo_id: str) -> str:
    """NAMESPACE/NAME with the Hub's rules, or a PizooError that says what they are."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    rules = ("expected NAMESPACE/NAME using letters, digits, '-', '_' and '.', at most 96 characters, "
             "without '--' or '..', not starting or ending with '-' or '.'")
    if not HUB_ID.match(repo_id):
        raise PizooError(f"repo id '{repo_id}': {rules}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PizooError(f"repo id '{repo_id}': {rules}") from None
    if repo_id.split("/")[1].endswith((".", "-")) or len(repo_id) > 96:
        raise PizooError(f"repo id '{repo_id}': {rules}")
    return repo_id


# --------------------------------------------------------------------------------------------
# What a push uploads


@dataclass
class UploadFile:
    path_in_repo: str
    size: int
    source: Path | None = None  # the local file; None for the generated model card
    content: bytes | None = None  # the model card's bytes


@dataclass
class PushResult:
    url: str | None  # the repo (or branch, or pull request) on the Hub; None for a dry run
    commit: str | None
    files: list[UploadFile]
    card: str
    pr_url: str | None = None
    dry_run: bool = False
    forced: bool = False
    zoo_entry: str | None = None
    unchanged: bool = False  # the repo already held exactly these files: no commit was made

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class Release:
    """An artifact folder read for publishing: its parts, its JSON records and the gate verdict."""

    artifact: Artifact
    config: dict
    calibration: dict | None
    evaluation: dict | None
    run: dict | None

    @property
    def gate_passed(self) -> bool | None:
        """True/False from eval.json's gate; None when no evaluation or no gate was recorded."""
        gate = (self.evaluation or {}).get("gate")
        if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
            return None
        return gate["passed"]


def read_release(folder: str | os.PathLike) -> Release:
    art = locate_artifact(folder)
    config = read_json(art.hf_dir / "config.json", "config.json")
    calib_path = art.hf_dir / "calibration.json"
    calibration = read_json(calib_path, "calibration.json") if calib_path.is_file() else None
    evaluation = read_json(art.eval_json, "eval.json") if art.eval_json else None
    run = read_json(art.run_json, "run.json") if art.run_json else None
    return Release(artifact=art, config=config, calibration=calibration, evaluation=evaluation, run=run)


def gguf_file_type(path: Path) -> str | None:
    """The GGUF's general.file_type as a label (F32, F16, BF16, Q8_0, ...), None when absent."""
    from .export.gguf import open_gguf
    from .gguf_import import gguf_file_type_label

    return gguf_file_type_label(open_gguf(path))


def gguf_repo_name(release: Release, gguf_path: Path, repo_id: str | None = None) -> str:
    """The GGUF's one name, locally and on the Hub: the name the exporter gives it
    (pizoo.export.gguf.default_file_name), e.g. SmolLM2-135M-Instruct-32K-PI-Q8_0.gguf. (`repo_id`
    no longer matters: the name comes from the base's public identity.)"""
    from .config import ModelConfig
    from .export.gguf import default_file_name, field, open_gguf

    art = release.artifact
    cfg = ModelConfig.from_file(art.hf_dir / "config.json")
    kind = gguf_file_type(gguf_path) or "F32"
    static = None
    if cfg.rope.type == "dynamic":  # baked at the length the file declares
        reader = open_gguf(gguf_path)
        static = field(reader, f"{field(reader, 'general.architecture')}.context_length")
    return default_file_name(art.hf_dir, cfg, kind, static)


def plan_upload(release: Release, repo_id: str) -> list[UploadFile]:
    """Every file of the commit except README.md, with its path in the repo."""
    art = release.artifact
    skip = {p.resolve() for p in art.eval_files()}
    files: list[UploadFile] = []
    for path in art.hf_files():
        rel = path.relative_to(art.hf_dir).as_posix()
        if rel == "README.md" or path.resolve() in skip:
            continue  # the generated card replaces any README; eval files go under eval/
        files.append(UploadFile(rel, path.stat().st_size, path))
    for path in art.gguf_files:
        files.append(UploadFile(gguf_repo_name(release, path), path.stat().st_size, path))
    for path in art.trtllm_files():
        files.append(UploadFile(f"trtllm/{path.relative_to(art.trtllm_dir).as_posix()}", path.stat().st_size, path))
    for path in art.eval_files():
        files.append(UploadFile(f"eval/{path.name}", path.stat().st_size, path))
    files = [_without_local_paths(f) for f in files]
    seen: dict[str, Path | None] = {}
    for f in files:
        if f.path_in_repo in seen:
            raise PizooError(f"{f.source}: would be uploaded as '{f.path_in_repo}' like {seen[f.path_in_repo]}; "
                             "keep one GGUF file per type in the release folder")
        seen[f.path_in_repo] = f.source
    return files


def publishable_json(path: Path) -> bytes | None:
    """The JSON file's bytes with every absolute path of this machine (a string naming a file or
    folder that exists here, or a path inside the user's folders: home, PIZOO_HOME, the working
    folder) cut to its last component, or None when it holds none. calibration.json
    and eval.json record local paths so that pizoo finds the base and the data again; the Hub copy
    must not show the publisher's directories and user name."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None  # not JSON after all: uploaded as it is
    changed = False
    roots = local_roots(pizoo_home())

    def ours(value: str) -> bool:
        """A file or folder here, or a path inside the user's folders (a data file since deleted)."""
        return Path(value).exists() or find_local_path(value, roots) is not None

    def scrub(value: Any) -> Any:
        nonlocal changed
        if isinstance(value, str):
            # A name too: "//" is absolute and exists (the root) but names nothing of ours.
            if os.path.isabs(value) and len(value) < 4096 and Path(value).name and ours(value):
                changed = True
                return Path(value).name
            return value
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, dict):  # keys too: calibration.json's data.per_source is keyed by source
            return {scrub(k): scrub(v) for k, v in value.items()}
        return value

    base = data.get("base_model") if path.name == "calibration.json" and isinstance(data, dict) else None
    if isinstance(base, dict):
        # The base is published by its identity and sha256: where it lay here, and a spec that was a
        # path, are this machine's business (checked before the scrub cuts a path to its last name).
        for key in ("path", "spec"):
            if key in base and (key == "path" or _names_a_local_path(base[key])):
                del base[key]
                changed = True
    data = scrub(data)
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode() if changed else None


def _names_a_local_path(spec: Any) -> bool:
    if not isinstance(spec, str):
        return False
    path = Path(spec).expanduser()
    return path.is_absolute() or spec.startswith(("~", ".")) or path.exists() or ("/" in spec and not HUB_ID.match(spec))


# pizoo's own JSON records, which hold local paths; every other file (tokenizer.json above all,
# whose vocabulary has strings like "//") goes up byte for byte.
RECORDS_WITH_PATHS = ("calibration.json", "eval.json")


def _without_local_paths(f: UploadFile) -> UploadFile:
    if f.source is None or f.content is not None or f.source.name not in RECORDS_WITH_PATHS:
        return f
    content = publishable_json(f.source)
    return f if content is None else UploadFile(f.path_in_repo, len(content), f.source, content)


def release_base(release: Release) -> Identity:
    return base_identity(release.config, release.calibration)


def check_nothing_local(release: Release, files: list[UploadFile]) -> None:
    """Refuse (one error line naming the file and key) when any file of the commit holds one of the
    user's folders: home, PIZOO_HOME, the working folder or the release folder (pizoo.privacy)."""
    from .privacy import check_publishable

    roots = local_roots(release.artifact.root, pizoo_home())
    check_publishable([(f.path_in_repo, f.source, f.content) for f in files], roots)


def inherited_license(release: Release) -> str | None:
    """The base's license: its recorded identity, its local card, its zoo copy's card, the aliases'
    data, in that order."""
    ident = release_base(release)
    if ident.license:
        return ident.license
    base = (release.calibration or {}).get("base_model") or {}
    base_id = ident.hub_id
    cards = []
    if base.get("path"):
        cards.append(Path(base["path"]) / "README.md")
    if base_id:
        pulled = Zoo().find_by_hub(base_id)
        if pulled:
            cards.append(Path(pulled["path"]) / "README.md")
    for card in cards:
        lic = read_card_license(card)
        if lic:
            return lic
    return license_for(base_id)


def trtllm_build_line(release: Release) -> str | None:
    """The trtllm-build command for the uploaded trtllm/ folder (paths as they are in the repo)."""
    from .export.trtllm import trtllm_build_command

    tdir = release.artifact.trtllm_dir
    if tdir is None:
        return None
    line = trtllm_build_command(tdir)
    return line.replace(shlex.quote(str(tdir)), "trtllm").replace(str(tdir), "trtllm")


def card_for(release: Release, repo_id: str, files: list[UploadFile], *, forced: bool) -> str:
    facts = CardFacts(
        repo_id=repo_id, config=release.config, calibration=release.calibration, evaluation=release.evaluation,
        files=[(f.path_in_repo, f.size) for f in files],
        gguf_files=[f.path_in_repo for f in files if f.path_in_repo.endswith(".gguf")],
        trtllm_build=trtllm_build_line(release),
        plot=next((f.path_in_repo for f in files if f.path_in_repo.startswith("eval/") and f.path_in_repo.endswith(".png")), None),
        license=inherited_license(release), forced=forced, base=release_base(release),
        reproduce=reproduce_command(release.calibration, release.run, release.config),
        quant_quality=quant_quality_rows(release, files))
    return render_card(facts)


def quant_quality_rows(release: Release, files: list[UploadFile]) -> list[dict] | None:
    """The card's GGUF quant table, from the ladder's llama.cpp measurements (OUT/gguf/quality.json)."""
    path = release.artifact.root / "gguf" / "quality.json"
    if not path.is_file():
        return None
    from .eval.llamacpp import card_rows

    names = {f.source.name: f.path_in_repo for f in files if f.source is not None and f.path_in_repo.endswith(".gguf")}
    return card_rows(read_json(path, "quality.json"), names) or None


def check_gate(release: Release, *, force: bool) -> bool:
    """Refuse a failed or missing gate unless `force`. Returns whether the push is forced past it."""
    passed = release.gate_passed
    if passed:
        return False
    if force:
        return True
    art = release.artifact
    if passed is False:
        reasons = "; ".join(failing_reasons((release.evaluation or {}).get("gate") or {})) or "no reasons recorded"
        raise GateFailed(f"{art.eval_json}: the evaluation gate failed ({reasons}); improve the model, or pass "
                         "--force to publish anyway (the card will say so)")
    where = art.eval_json or f"{art.root / 'eval' / 'eval.json'} or {art.root / 'eval.json'}"
    raise PizooError(f"{where}: no evaluation gate verdict (the gate never ran); run `pizoo eval` first, or pass "
                     "--force to publish anyway (the card will say so)")


# --------------------------------------------------------------------------------------------
# Push


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, dry_run: bool = False, force: bool = False, token: str | None = None) -> PushResult:
    """Publish a release folder (or an HF folder) to the Hub in one commit; record it in the zoo.

    dry_run: plan the files and the card, contact no one. revision: a branch, created from main
    when missing. create_pr: open a pull request against main instead of committing to it.
    """
    check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise PizooError(f"--create-pr with --revision {revision}: a pull request targets main; drop one of them")
    release = read_release(folder)
    forced = check_gate(release, force=force)
    files = plan_upload(release, repo_id)
    card = card_for(release, repo_id, files, forced=forced)
    files.append(UploadFile("README.md", len(card.encode()), None, card.encode()))
    check_nothing_local(release, files)
    if dry_run:
        return PushResult(url=None, commit=None, files=files, card=card, dry_run=True, forced=forced)

    endpoint = hub_endpoint()
    if hub_offline():
        raise PizooError("HF_HUB_OFFLINE is set: pizoo will not contact the Hub; unset it (or set HF_HUB_OFFLINE=0) "
                         "to push, or use --dry-run")
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    token = token or get_token()
    if not token:
        raise PizooError(f"no Hugging Face token to push with; {LOGIN_HINT}")
    bound_hub_requests()
    api = HfApi(endpoint=endpoint, token=token, library_name="pizoo", library_version=__version__)

    def send():
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # The head before the commit: huggingface_hub skips a commit whose files are all unchanged
        # and returns this same head, which must not be reported as a new push.
        head = None if create_pr else _head_commit(api, repo_id, revision or "main")
        ops = [CommitOperationAdd(path_in_repo=f.path_in_repo,
                                  path_or_fileobj=f.content if f.content is not None else str(f.source))
               for f in files]
        info = api.create_commit(repo_id, ops, commit_message=_commit_summary(release),
                                 commit_description=f"Published with pizoo {__version__}."
                                 + (" Forced past a failed or missing evaluation gate." if forced else ""),
                                 revision=revision, create_pr=create_pr)
        return head, info

    # Every client failure becomes one line; nothing is recorded as published. A retry re-sends only
    # what the Hub does not hold yet (the LFS batch skips stored objects).
    head, info = with_retries(send, action="push to", repo_id=repo_id, endpoint=endpoint, token=token)

    url = f"{endpoint}/{repo_id}" + (f"/tree/{revision}" if revision and revision != "main" and not create_pr else "")
    entry = Zoo().record_publication(release.artifact.root, {
        "repo_id": repo_id, "revision": "main" if create_pr else (revision or "main"), "commit": info.oid,
        "url": url, "pr_url": info.pr_url, "endpoint": endpoint, "forced": forced,
        "files": [{"path": f.path_in_repo, "size": f.size} for f in files]})
    return PushResult(url=url, commit=info.oid, files=files, card=card, pr_url=info.pr_url, forced=forced,
                      zoo_entry=entry["name"], unchanged=head is not None and info.oid == head)


def _head_commit(api, repo_id: str, revision: str) -> str | None:
    """The branch's current commit, or None (a new repo or branch, or a Hub that does not say)."""
    try:
        return api.repo_info(repo_id, revision=revision).sha
    except Exception:  # only a hint for the report; the commit itself surfaces real errors
        return None


def push_release(folder: str | os.PathLike, repo_id: str, *, progress: bool = False, **options) -> dict:
    """`push` for the `pizoo extend` pipeline: the result as a plain dict for run.json, with the
    client's progress bars shown only when `progress`."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    were_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        result = push(folder, repo_id, **options)
    finally:
        if not progress and not were_disabled:
            enable_progress_bars()
    return {"repo_id": repo_id, "url": result.url, "commit": result.commit, "pr_url": result.pr_url,
            "files": len(result.files), "bytes": result.total_bytes, "forced": result.forced,
            "zoo_entry": result.zoo_entry, "unchanged": result.unchanged}


def _commit_summary(release: Release) -> str:
    method = method_of(release.config, release.calibration)
    ctx = context_of(release.config, release.calibration)
    what = ", ".join(str(x) for x in (method, f"{ctx} tokens" if ctx else None) if x)
    return f"pizoo: context-extended model ({what})" if what else "pizoo: upload model"


# --------------------------------------------------------------------------------------------
# Pull


def pull(repo_id: str, revision: str | None = None, *, token: str | None = None) -> Path:
    """Download a Hub repo (or an alias's repo) into the zoo and register it; returns the HF folder.

    A pull already in the zoo at the same commit is not downloaded again. Partial downloads stay in
    PIZOO_HOME/downloads/ and are resumed by the next pull.
    """
    info = alias_info(repo_id) if "/" not in repo_id else None
    if info is None and "/" not in repo_id:
        raise PizooError(f"'{repo_id}': not an alias (see `pizoo zoo aliases`, or add one with `pizoo zoo alias`) "
                         "nor a Hub repo id; give NAMESPACE/NAME")
    hub_id = check_repo_id(info["hub_id"] if info else repo_id)
    zoo = Zoo()
    if hub_offline():
        hit = zoo.find_by_hub(hub_id, revision)
        if hit is not None:
            return _hf_dir(hit)
        raise PizooError(f"HF_HUB_OFFLINE is set and {hub_id} is not in the zoo; unset HF_HUB_OFFLINE to pull it")
    from huggingface_hub import HfApi, snapshot_download

    endpoint = hub_endpoint()
    slug = hub_id.replace("/", "--") + (f"@{revision.replace('/', '--')}" if revision and revision != "main" else "")
    staging = zoo.home / "downloads" / slug
    bound_hub_requests()
    api = HfApi(endpoint=endpoint, token=token, library_name="pizoo", library_version=__version__)
    retrying = dict(action="pull", repo_id=hub_id, endpoint=endpoint, token=token)
    commit = with_retries(lambda: api.repo_info(hub_id, revision=revision).sha, **retrying)
    hit = zoo.find_by_hub(hub_id, revision)
    if hit is not None and hit["hub"].get("commit") == commit and _files_present(hit):
        return _hf_dir(hit)
    final = zoo.home / "models" / slug
    # One pull of a repo at a time (a second one waits, then finds it in the zoo).
    with output_lock(staging, wait=PULL_WAIT_S):
        hit = zoo.find_by_hub(hub_id, revision)
        if hit is not None and hit["hub"].get("commit") == commit and _files_present(hit):
            return _hf_dir(hit)
        with_retries(lambda: snapshot_download(hub_id, revision=commit, local_dir=staging,
                                               cache_dir=zoo.home / "downloads" / ".hf-cache", endpoint=endpoint,
                                               token=token, library_name="pizoo", library_version=__version__),
                     **retrying)
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # download bookkeeping, not model files
        replace_dir(staging, final)
        hub = {"repo_id": hub_id, "revision": revision or "main", "commit": commit, "endpoint": endpoint}
        entry = zoo.register_folder(final, name=default_name(final, hub), source="hub", hub=hub)
    return _hf_dir(entry)


def _hf_dir(entry: dict) -> Path:
    return Path(entry["path"]) / (entry["formats"]["hf"].get("path") or ".")


def _files_present(entry: dict) -> bool:
    root = Path(entry["path"])
    return all((root / f["path"]).is_file() and (root / f["path"]).stat().st_size == f["size"]
               for fmt in entry["formats"].values() for f in fmt["files"])
