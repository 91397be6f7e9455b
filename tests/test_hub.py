"""`pizoo push` / `pizoo pull` through the real huggingface_hub client against a real HTTP Hub test server.

The release folder is built from real files: a tiny HF model (pizoo.synthetic), its GGUF and
TensorRT-LLM exports (pizoo.export), and hand-written calibration.json / eval.json / run.json
following the layout the other stages write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from hub_server import HubServer, TokenInfo

WRITE_TOKEN = "hf_pizooTestWriteToken0123456789"
READ_TOKEN = "hf_pizooTestReadToken0123456789"
BAD_TOKEN = "hf_pizooTestBadToken0123456789"
BASE_ID = "HuggingFaceTB/SmolLM2-135M"


def png_bytes(width: int = 4, height: int = 3) -> bytes:
    """A small valid RGB PNG (stands for the eval plot; the card only links it)."""
    rows = b"".join(b"\x00" + bytes(c for x in range(width) for c in ((x * 40) % 256, (y * 60) % 256, 128))
                    for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_release(out: Path, base: Path, *, gate: bool | None = True, exports: bool = True) -> Path:
    """A release folder like `pizoo extend` writes: hf/, gguf/, trtllm/, eval/, run.json."""
    from pizoo.config import RopeConfig
    from pizoo.synthetic import write_tiny_model

    write_tiny_model(base, overwrite=True)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the base\n")
    hf = out / "hf"
    write_tiny_model(hf, rope=RopeConfig().scaled("linear", 4.0, 64), max_position_embeddings=256, overwrite=True)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["pizoo"] = {"rope_method": "linear", "target_context": 256, "base_model": BASE_ID, "recipe": "pi"}
    (hf / "config.json").write_text(json.dumps(cfg, indent=2))
    calibration = {
        "base_model": {"spec": "smollm2-135m", "path": str(base), "hub_id": BASE_ID, "sha256": "ab" * 32},
        "recipe": {"name": "pi", "method": "linear",
                   "hyperparameters": {"lr": 2e-5, "betas": [0.9, 0.95], "warmup_steps": 20}},
        "method": "pi", "factor": 4.0, "ctx": 256, "original_context": 64, "steps": 30, "tokens": 7680,
        "train_len": 64, "seed": 0, "final_loss": 3.21,
        "data": {"sources": ["builtin:corpus"], "fingerprint": "f00d" * 4, "documents": 12, "tokens": 40000},
    }
    (hf / "calibration.json").write_text(json.dumps(calibration, indent=2))
    if exports:
        from pizoo.export.gguf import export_gguf
        from pizoo.export.trtllm import export_trtllm

        (out / "gguf").mkdir(parents=True, exist_ok=True)
        export_gguf(hf, out / "gguf" / "model-q8_0.gguf", dtype="q8_0", overwrite=True)
        export_trtllm(hf, out / "trtllm", overwrite=True)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    if gate is not None:
        evaluation = {
            "results": [{"ctx": 64, "ppl": 9.5, "tokens": 1000, "documents": 3, "stride": 32},
                        {"ctx": 256, "ppl": 9.125, "tokens": 1000, "documents": 3, "stride": 32}],
            "passkey": {"accuracy_by_distance": {"32": 1.0, "128": 0.9}, "k_max": 256},
            "gate": {"passed": gate, "reasons": [] if gate else ["ppl at 256 is 12.0 > 1.10 x base 9.5"],
                     "thresholds": {"ppl_ratio": 1.1}},
            "baseline": {"results": [{"ctx": 64, "ppl": 9.4}]},
        }
        (out / "eval" / "eval.json").write_text(json.dumps(evaluation, indent=2))
        (out / "eval" / "ppl.png").write_bytes(png_bytes())
    (out / "run.json").write_text(json.dumps({"command": ["pizoo", "extend", "smollm2-135m", "--ctx", "256",
                                                          "--recipe", "pi", "--steps", "30"]}))
    return out


@pytest.fixture(scope="module")
def built_release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    return write_release(root / "tiny-256-pi", root / "base")


@pytest.fixture
def release(built_release, tmp_path) -> Path:
    """A private copy of the release (some tests change it); the base folder stays shared."""
    dst = tmp_path / "tiny-256-pi"
    shutil.copytree(built_release, dst)
    return dst


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    assert constants.HF_HUB_DISABLE_XET, "tests/conftest.py must set HF_HUB_DISABLE_XET=1 before huggingface_hub loads"
    server = HubServer({WRITE_TOKEN: TokenInfo("alice", write=True, orgs=("pizoo-org",)),
                        READ_TOKEN: TokenInfo("alice", write=False)}).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("PIZOO_HOME", str(tmp_path / "pizoo-home"))
    yield server
    server.stop()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def invoke(*args: str, **env: str | None) -> CliResult:
    """The `pizoo` Typer app in this process (faster than a fresh interpreter), with env changes."""
    from typer.testing import CliRunner

    from pizoo.cli import app

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            if v is None:
                mp.delenv(k, raising=False)
            else:
                mp.setenv(k, v)
        result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


def run_cli(*args: str, **env: str | None) -> subprocess.CompletedProcess:
    """The real `pizoo` command in a fresh process; env values of None are removed."""
    full = dict(os.environ)
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([sys.executable, "-m", "pizoo.cli", *args], capture_output=True, text=True, env=full,
                          timeout=120)


def local_files(release: Path) -> dict[str, bytes]:
    """The release's files by path in the repo (README.md excluded), as they are on disk."""
    out = {p.name: p.read_bytes() for p in (release / "hf").iterdir()}
    out["SmolLM2-135M-256-PI-Q8_0.gguf"] = (release / "gguf" / "model-q8_0.gguf").read_bytes()
    for p in (release / "trtllm").iterdir():
        out[f"trtllm/{p.name}"] = p.read_bytes()
    out["eval/eval.json"] = (release / "eval" / "eval.json").read_bytes()
    out["eval/ppl.png"] = (release / "eval" / "ppl.png").read_bytes()
    return out


def hub_files(release: Path) -> dict[str, bytes]:
    """What must arrive on the Hub: the files as on disk, calibration.json with its local base path
    cut to the folder's name (test_push_uploads_every_file_byte_for_byte checks that cut itself)."""
    from pizoo.hub import publishable_json

    out = local_files(release)
    out["calibration.json"] = publishable_json(release / "hf" / "calibration.json")
    return out


def card_metadata(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zoo_text(home: Path) -> str:
    path = home / "zoo.json"
    return path.read_text() if path.exists() else ""


# --------------------------------------------------------------------------------------------


def test_push_uploads_every_file_byte_for_byte(hub, release, tmp_path):
    home = Path(os.environ["PIZOO_HOME"])
    proc = run_cli("push", str(release), "alice/tiny-256-pi")
    assert proc.returncode == 0, proc.stderr
    assert "pushed 13 files" in proc.stdout and f"{hub.url}/alice/tiny-256-pi" in proc.stdout

    remote = hub.state.files("alice/tiny-256-pi")
    expected = local_files(release)
    assert set(remote) == set(expected) | {"README.md", ".gitattributes"}
    local_paths = {"calibration.json": ("base_model", "path")}
    for path, data in expected.items():
        if path not in local_paths:
            assert remote[path] == data, path
            continue
        # calibration.json records where the base lay here: the Hub copy names the base by its
        # identity and sha256 only, and nothing else differs.
        ours, theirs = json.loads(data), json.loads(remote[path])
        outer, key = local_paths[path]
        assert Path(ours[outer][key]).is_absolute() and key not in theirs[outer]
        assert str(release.parent) not in remote[path].decode() and str(Path.home()) not in remote[path].decode()
        theirs[outer][key] = ours[outer][key]
        assert theirs == ours
    # One commit on top of the initial one; the weights, GGUF and plot went through the LFS path.
    repo = hub.state.repos["alice/tiny-256-pi"]
    assert len(repo.commits) == 2
    lfs_paths = {p for p, b in repo.resolve("main").files.items() if b.lfs}
    assert lfs_paths == {"model.safetensors", "SmolLM2-135M-256-PI-Q8_0.gguf", "trtllm/rank0.safetensors",
                         "eval/ppl.png"}
    assert {hashlib.sha256(expected[p]).hexdigest() for p in lfs_paths} == set(hub.state.lfs_puts)

    meta = card_metadata(remote["README.md"])
    assert meta["base_model"] == BASE_ID and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"  # inherited from the base's card
    assert {"context-extension", "rope-scaling", "pi", "gguf", "pizoo"} <= set(meta["tags"])
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [(m["type"], m["value"]) for m in metrics] == [("perplexity", 9.5), ("perplexity", 9.125)]
    card = remote["README.md"].decode()
    for needle in ("Position Interpolation", "factor 4", "| lr | 2e-05 |", "Steps: 30", "builtin:corpus",
                   "| 256 | 9.125 |", "](eval/ppl.png)", "AutoModelForCausalLM.from_pretrained(\"alice/tiny-256-pi\"",
                   "llama-completion -m SmolLM2-135M-256-PI-Q8_0.gguf -c 256 -n 64",
                   "llama-server -m SmolLM2-135M-256-PI-Q8_0.gguf -c 256", 'dtype="auto"',
                   "trtllm-build --checkpoint_dir trtllm --output_dir trtllm-engine",
                   "pizoo extend smollm2-135m --ctx 256 --recipe pi --steps 30"):
        assert needle in card, needle
    assert "--force" not in card

    # The token went to the server only.
    for text in (proc.stdout, proc.stderr, card, zoo_text(home)):
        assert WRITE_TOKEN not in text
    entry = json.loads(zoo_text(home))["entries"]["tiny-256-pi"]
    assert entry["published"][0]["repo_id"] == "alice/tiny-256-pi"
    assert entry["published"][0]["commit"] == repo.refs["main"]

    # Pushing the same release again changes nothing on the Hub, and says so.
    again = run_cli("push", str(release), "alice/tiny-256-pi")
    assert again.returncode == 0, again.stderr
    assert "nothing to push" in again.stdout and "pushed 13 files" not in again.stdout
    assert len(repo.commits) == 2 and f"commit {repo.refs['main']}" in again.stdout
    assert len(json.loads(zoo_text(home))["entries"]["tiny-256-pi"]["published"]) == 1


def test_push_then_pull_round_trip(hub, release):
    from pizoo.hub import pull, push
    from pizoo.resolve import resolve_model
    from pizoo.zoo import Zoo

    result = push(release, "pizoo-org/tiny-256-pi")
    assert result.commit == hub.state.repos["pizoo-org/tiny-256-pi"].refs["main"]
    pulled = pull("pizoo-org/tiny-256-pi")
    expected = hub_files(release)
    for path, data in expected.items():
        assert (pulled / path).read_bytes() == data, path
    assert (pulled / "README.md").read_text() == result.card

    zoo = Zoo()
    names = {e["name"] for e in zoo.list()}
    assert names == {"tiny-256-pi", "pizoo-org/tiny-256-pi"}
    local, remote = zoo.get("tiny-256-pi"), zoo.get("pizoo-org/tiny-256-pi")
    assert local["published"][0]["commit"] == result.commit
    assert remote["hub"]["commit"] == result.commit and remote["source"] == "hub"
    assert remote["lineage"]["base_model"] == BASE_ID and remote["kind"] == "extended"
    # Every file arrives unchanged, except calibration.json, whose local base path was cut.
    hashes = {f["sha256"] for fmt in local["formats"].values() for f in fmt["files"]
              if not f["path"].endswith("calibration.json")}
    pulled_hashes = {f["sha256"] for fmt in remote["formats"].values() for f in fmt["files"]}
    assert hashes <= pulled_hashes
    assert set(remote["formats"]) == {"hf", "gguf", "trtllm", "eval"}
    assert zoo.verify("pizoo-org/tiny-256-pi").ok

    # A second pull at the same commit downloads nothing; resolution finds the zoo copy.
    gets = sum(1 for m, p in hub.state.requests if "/resolve/" in p)
    assert pull("pizoo-org/tiny-256-pi") == pulled
    assert sum(1 for m, p in hub.state.requests if "/resolve/" in p) == gets
    resolved = resolve_model("pizoo-org/tiny-256-pi")
    assert resolved.source == "zoo" and resolved.path == pulled and resolved.revision == result.commit


def test_dry_run_lists_files_and_card_and_contacts_no_one(hub, release):
    proc = invoke("push", str(release), "alice/tiny-256-pi", "--dry-run", HF_TOKEN=None,
                   HF_HOME=str(Path(os.environ["PIZOO_HOME"]) / "hf-home"))
    assert proc.returncode == 0, proc.stderr
    assert hub.state.requests == []
    for path, data in hub_files(release).items():
        line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(path + " "))
        from pizoo.fsutil import human_bytes

        assert human_bytes(len(data)) in line
    assert "--- README.md ---" in proc.stdout and "base_model: HuggingFaceTB/SmolLM2-135M" in proc.stdout
    assert not (Path(os.environ["PIZOO_HOME"]) / "zoo.json").exists()


def _one_line_error(proc: CliResult | subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_token_is_a_one_line_401(hub, release):
    line = _one_line_error(invoke("push", str(release), "alice/tiny-256-pi", HF_TOKEN=BAD_TOKEN))
    assert "401" in line and "hf auth login" in line and "HF_TOKEN" in line
    assert BAD_TOKEN not in line
    assert hub.state.repos == {}
    assert "published" not in zoo_text(Path(os.environ["PIZOO_HOME"]))


def test_read_only_token_is_a_403(hub, release):
    from pizoo.errors import PizooError
    from pizoo.hub import push
    from pizoo.zoo import Zoo

    with pytest.raises(PizooError, match="403") as e:
        push(release, "alice/tiny-256-pi", token=READ_TOKEN)
    assert READ_TOKEN not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PizooError, match="403"):
        push(release, "someone-else/tiny-256-pi")  # a namespace the token cannot write to
    assert Zoo().list() == []


def test_no_token_says_how_to_log_in(hub, release, tmp_path):
    line = _one_line_error(run_cli("push", str(release), "alice/tiny-256-pi", HF_TOKEN=None,
                                   HF_HOME=str(tmp_path / "empty-hf-home")))
    assert "no Hugging Face token" in line and "hf auth login" in line and "HF_TOKEN" in line
    assert hub.state.requests == []


def test_existing_repo_is_reused_and_unchanged_files_are_not_resent(hub, release):
    from pizoo.hub import push

    hub.state.create_repo("alice/tiny-256-pi", files={"NOTES.md": b"kept\n"})
    first = push(release, "alice/tiny-256-pi")
    repo = hub.state.repos["alice/tiny-256-pi"]
    assert hub.state.files("alice/tiny-256-pi")["NOTES.md"] == b"kept\n"
    assert len(repo.commits) == 3 and repo.refs["main"] == first.commit
    puts = list(hub.state.lfs_puts)
    second = push(release, "alice/tiny-256-pi")  # nothing changed: no upload, no new commit
    assert hub.state.lfs_puts == puts
    assert second.commit == first.commit and len(repo.commits) == 3


def test_unreachable_server_is_one_line(hub, release):
    url = f"http://127.0.0.1:{closed_port()}"
    line = _one_line_error(invoke("push", str(release), "alice/tiny-256-pi", HF_ENDPOINT=url))
    assert "cannot reach the Hub" in line and url in line
    assert "published" not in zoo_text(Path(os.environ["PIZOO_HOME"]))


def test_offline_mode_is_one_line(hub, release):
    line = _one_line_error(invoke("push", str(release), "alice/tiny-256-pi", HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE" in line
    assert hub.state.requests == []
    line = _one_line_error(invoke("pull", "alice/never-pulled", HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE" in line


def test_pull_of_a_name_that_is_neither_alias_nor_hub_id(hub):
    line = _one_line_error(invoke("pull", "no-such-alias"))
    assert "'no-such-alias': not an alias" in line and "pizoo zoo aliases" in line and "NAMESPACE/NAME" in line
    assert hub.state.requests == []


@pytest.mark.parametrize("bad", ["no-namespace", "alice/bad name", "alice/x--y", "alice/-x", "a/b/c", "alice/" + "x" * 100])
def test_invalid_repo_id_is_rejected_before_any_request(hub, release, bad):
    from pizoo.errors import PizooError
    from pizoo.hub import push

    with pytest.raises(PizooError, match="NAMESPACE/NAME"):
        push(release, bad)
    assert hub.state.requests == []


def test_failed_gate_is_refused_unless_forced(hub, release):
    evaluation = json.loads((release / "eval" / "eval.json").read_text())
    evaluation["gate"] = {"passed": False, "reasons": ["ppl at 256 is 12.0 > 1.10 x base 9.5"]}
    (release / "eval" / "eval.json").write_text(json.dumps(evaluation))
    proc = invoke("push", str(release), "alice/tiny-256-pi")
    assert proc.returncode == 3 and "gate failed" in proc.stderr and "12.0 > 1.10" in proc.stderr
    assert "--force" in proc.stderr and hub.state.requests == []

    proc = invoke("push", str(release), "alice/tiny-256-pi", "--force")
    assert proc.returncode == 0, proc.stderr
    card = hub.state.files("alice/tiny-256-pi")["README.md"].decode()
    assert "published with `--force`" in card and "12.0 > 1.10" in card


def test_missing_gate_is_refused_unless_forced(hub, release):
    from pizoo.errors import GateFailed, PizooError
    from pizoo.hub import push

    shutil.rmtree(release / "eval")
    with pytest.raises(PizooError, match="gate never ran") as e:
        push(release, "alice/tiny-256-pi")
    assert not isinstance(e.value, GateFailed)
    result = push(release, "alice/tiny-256-pi", force=True)
    assert result.forced and "although no evaluation ran (neither the measurements nor the gate)" in result.card


def test_revision_branch_and_pull_request(hub, release):
    from pizoo.hub import push

    result = push(release, "alice/tiny-256-pi", revision="long-ctx")
    repo = hub.state.repos["alice/tiny-256-pi"]
    assert set(hub.state.files("alice/tiny-256-pi", "main")) == {".gitattributes"}
    assert "config.json" in hub.state.files("alice/tiny-256-pi", "long-ctx")
    assert result.url.endswith("/tree/long-ctx") and result.commit == repo.refs["long-ctx"]

    pr = push(release, "alice/tiny-256-pi", create_pr=True)
    assert pr.pr_url.endswith("/discussions/1") and repo.refs["refs/pr/1"] == pr.commit
    assert set(hub.state.files("alice/tiny-256-pi", "main")) == {".gitattributes"}


def test_failed_commit_records_nothing_and_a_retry_uploads_only_what_is_missing(hub, release):
    from pizoo.errors import PizooError
    from pizoo.hub import push
    from pizoo.zoo import Zoo

    hub.state.fail_next_commit = 500
    with pytest.raises(PizooError, match="500") as e:
        push(release, "alice/tiny-256-pi")
    assert "\n" not in str(e.value)
    assert Zoo().list() == []
    uploaded = list(hub.state.lfs_puts)
    assert len(uploaded) == 4  # the LFS objects arrived before the commit failed
    result = push(release, "alice/tiny-256-pi")
    assert hub.state.lfs_puts == uploaded  # the retry sent none of them again
    assert hub.state.files("alice/tiny-256-pi")["model.safetensors"] == (release / "hf" / "model.safetensors").read_bytes()
    assert Zoo().get("tiny-256-pi")["published"][0]["commit"] == result.commit


def test_pipeline_entry_points_push_release_and_register_release(hub, release):
    from pizoo.hub import push_release
    from pizoo.zoo import Zoo, register_release

    entry = register_release(release, name="my-release", base="smollm2-135m")
    assert entry["name"] == "my-release" and entry["lineage"]["base_spec"] == "smollm2-135m"
    info = push_release(release, "alice/tiny-256-pi")
    assert info["commit"] == hub.state.repos["alice/tiny-256-pi"].refs["main"] and info["files"] == 13
    published = Zoo().get("my-release")["published"]  # the push lands on the registered entry
    assert [p["commit"] for p in published] == [info["commit"]]


def test_card_from_the_records_calibrate_and_extend_really_write(hub, release):
    """calibration.json as pizoo.train writes it (the recipe is Recipe.to_dict(), the base a local folder,
    the default corpus) and run.json as pizoo.pipeline writes it (`command` is a dict of options)."""
    from pizoo.data import DEFAULT_CORPUS_NAME
    from pizoo.errors import GateFailed
    from pizoo.hub import push
    from pizoo.recipes import load_recipe

    hf = release / "hf"
    calib = json.loads((hf / "calibration.json").read_text())
    calib.update(recipe=load_recipe("pi").to_dict(), lr=2e-5, global_batch=4,
                 base_model={"spec": "my-base", "path": str(release.parent / "my-base"), "hub_id": None,
                             "sha256": "ab" * 32})
    calib["data"]["sources"] = [DEFAULT_CORPUS_NAME]
    (hf / "calibration.json").write_text(json.dumps(calib))
    cfg = json.loads((hf / "config.json").read_text())
    cfg["pizoo"]["base_model"] = "my-base"
    (hf / "config.json").write_text(json.dumps(cfg))
    (release / "run.json").write_text(json.dumps({"command": {
        "model": "my-base", "ctx": 256, "recipe": "pi", "data": None, "steps": 30, "train_len": 64,
        "formats": ["hf", "gguf", "trtllm"], "gguf_dtype": "q8_0", "tp": 1, "push": "alice/x",
        "out": str(release), "seed": 0}, "stages": {}}))
    evaluation = json.loads((release / "eval" / "eval.json").read_text())
    evaluation["gate"] = {"passed": False, "reasons": ["pass: perplexity at the target context: ok",
                                                       "FAIL: passkey accuracy below 0.9 at 256"]}
    (release / "eval" / "eval.json").write_text(json.dumps(evaluation))

    with pytest.raises(GateFailed) as e:
        push(release, "alice/x")
    assert "passkey accuracy below 0.9 at 256" in str(e.value) and "pass:" not in str(e.value)
    card = push(release, "alice/x", dry_run=True, force=True).card
    meta = card_metadata(card.encode())
    # A local base is no Hub model id: the Hub would reject `base_model: my-base`.
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "](https://huggingface.co/my-base)" not in card
    for needle in ("| lr | 2e-05 |", "| betas | `[0.9, 0.95]` |", "| schedule | constant |", "| global_batch | 4 |"):
        assert needle in card, needle
    assert ("pizoo extend my-base --ctx 256 --recipe pi --steps 30 --train-len 64 --global-batch 4 "
            "--gguf-dtype q8_0\n") in card
    assert "although its evaluation gate failed (passkey accuracy below 0.9 at 256)" in card


def test_publishable_json_cuts_only_this_machines_paths(tmp_path):
    from pizoo.hub import publishable_json

    folder = tmp_path / "models" / "base"
    folder.mkdir(parents=True)
    record = {"base": {"path": str(folder), "hub_id": "org/base"}, "sources": [str(folder), "/not/on/this/machine"],
              "url": "https://huggingface.co/org/base", "n": 3}
    f = tmp_path / "calibration.json"
    f.write_text(json.dumps(record))
    out = json.loads(publishable_json(f))
    assert out == {"base": {"path": "base", "hub_id": "org/base"}, "sources": ["base", "/not/on/this/machine"],
                   "url": "https://huggingface.co/org/base", "n": 3}
    f.write_text(json.dumps({"path": "relative/dir", "other": "/not/on/this/machine", "token": "//"}))
    assert publishable_json(f) is None  # nothing to cut ("//" names no file): the file goes up byte for byte
    # A path inside the user's folders is cut even when it is gone (a deleted data file).
    gone = str(Path.home() / "corpus" / "deleted-since.txt")
    f.write_text(json.dumps({"data": {"sources": [gone], "per_source": {gone: {"documents": 3}}}}))
    assert json.loads(publishable_json(f)) == {"data": {"sources": ["deleted-since.txt"],
                                                        "per_source": {"deleted-since.txt": {"documents": 3}}}}
