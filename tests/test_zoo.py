"""The local model zoo: manifests, verify, rm, du, aliases, resolution, and concurrent writers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_hub import invoke, png_bytes


@pytest.fixture
def home(monkeypatch, tmp_path) -> Path:
    path = tmp_path / "pizoo-home"
    monkeypatch.setenv("PIZOO_HOME", str(path))
    return path


@pytest.fixture
def extended(tiny_model_factory, tmp_path) -> Path:
    """A release folder: hf/ (tiny model + calibration.json), eval/ (eval.json + ppl.png)."""
    out = tmp_path / "tiny-ext"
    shutil.copytree(tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece"), out / "hf")
    (out / "hf" / "calibration.json").write_text(json.dumps({
        "base_model": {"spec": "smollm2-135m", "hub_id": "HuggingFaceTB/SmolLM2-135M", "revision": "abc123",
                       "sha256": "cd" * 32},
        "recipe": {"name": "yarn", "hyperparameters": {"lr": 2e-5}}, "method": "yarn", "factor": 4.0,
        "ctx": 256, "original_context": 64, "steps": 12, "tokens": 3072,
        "data": {"sources": ["builtin:corpus"], "fingerprint": "beef" * 4}}))
    (out / "eval").mkdir()
    (out / "eval" / "eval.json").write_text(json.dumps({
        "results": [{"ctx": 256, "ppl": 8.5, "tokens": 500, "documents": 2, "stride": 64}],
        "passkey": {"k_max": 256}, "gate": {"passed": True, "reasons": []}}))
    (out / "eval" / "ppl.png").write_bytes(png_bytes())
    return out


def test_manifest_records_lineage_recipe_data_eval_and_formats(home, extended):
    from pizoo.fsutil import sha256_file
    from pizoo.zoo import Zoo

    entry = Zoo().register_folder(extended)
    assert entry["name"] == "tiny-ext" and entry["kind"] == "extended" and entry["source"] == "local"
    assert entry["lineage"] == {"base_model": "HuggingFaceTB/SmolLM2-135M", "base_revision": "abc123",
                                "base_sha256": "cd" * 32, "base_spec": "smollm2-135m",
                                "base_identity": {"hub_id": "HuggingFaceTB/SmolLM2-135M", "name": "SmolLM2-135M",
                                                  "organization": "HuggingFaceTB", "revision": "abc123",
                                                  "source": "hub"}}
    assert entry["recipe"]["name"] == "yarn" and entry["steps"] == 12 and entry["data_fingerprint"] == "beef" * 4
    assert entry["eval"]["results"][0]["ppl"] == 8.5 and entry["eval"]["gate_passed"] is True
    files = {f["path"]: f for f in entry["formats"]["hf"]["files"]}
    assert entry["formats"]["hf"]["path"] == "hf"
    weights = extended / "hf" / "model.safetensors"
    assert files["hf/model.safetensors"]["sha256"] == sha256_file(weights)
    assert files["hf/model.safetensors"]["size"] == weights.stat().st_size
    assert [f["path"] for f in entry["formats"]["eval"]["files"]] == ["eval/eval.json", "eval/ppl.png"]

    shown = invoke("zoo", "show", "tiny-ext")
    assert shown.returncode == 0 and json.loads(shown.stdout)["lineage"]["base_revision"] == "abc123"
    listed = invoke("zoo", "list", "--json")
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["method"], r["context"], r["formats"]) for r in rows] == [("tiny-ext", "yarn", 256, ["hf"])]
    assert "tiny-ext" in invoke("zoo", "list").stdout


def test_verify_reports_a_changed_file_and_exits_non_zero(home, extended):
    from pizoo.zoo import Zoo

    Zoo().register_folder(extended)
    ok = invoke("zoo", "verify", "tiny-ext")
    assert ok.returncode == 0 and "match their sha256" in ok.stdout
    weights = extended / "hf" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    (extended / "eval" / "ppl.png").unlink()
    bad = invoke("zoo", "verify", "tiny-ext")
    assert bad.returncode == 1
    assert "model.safetensors: sha256" in bad.stdout and "ppl.png: missing" in bad.stdout
    assert "2 of" in bad.stderr


def test_rm_deletes_only_files_the_zoo_owns_and_du_counts(home, extended):
    from pizoo.zoo import Zoo

    zoo = Zoo()
    zoo.register_folder(extended)
    owned = home / "models" / "org--pulled"
    shutil.copytree(extended / "hf", owned)
    zoo.register_folder(owned, name="org/pulled", source="hub",
                        hub={"repo_id": "org/pulled", "revision": "main", "commit": "0" * 40})
    usage = zoo.disk_usage()
    model_bytes = sum(p.stat().st_size for p in owned.iterdir())
    assert usage["entries"]["org/pulled"] == model_bytes and usage["home_on_disk"]["models"] == model_bytes
    assert "total" in invoke("zoo", "du").stdout

    out = invoke("zoo", "rm", "org/pulled")
    assert out.returncode == 0 and not owned.exists()
    out = invoke("zoo", "rm", "tiny-ext")
    assert out.returncode == 0 and "kept" in out.stdout and (extended / "hf" / "config.json").exists()
    assert zoo.list() == []
    missing = invoke("zoo", "rm", "tiny-ext")
    assert missing.returncode == 2 and "no entry named 'tiny-ext'" in missing.stderr


def test_shipped_and_user_aliases(home):
    from pizoo.zoo import alias_hub_id, alias_info, shipped_aliases

    shipped = shipped_aliases()
    for name in ("llama-7b", "llama-13b", "llama-2-7b", "llama-2-13b", "llama-3-8b", "llama-3.1-8b", "mistral-7b",
                 "qwen2-7b", "smollm2-135m"):
        assert {"hub_id", "architecture", "context"} <= set(shipped[name]), name
    assert alias_hub_id("llama-2-7b") == "meta-llama/Llama-2-7b-hf"
    assert alias_hub_id("SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert alias_info("llama-2-7b")["context"] == 4096
    assert alias_hub_id("no-such-alias") is None

    out = invoke("zoo", "alias", "llama-2-7b", "me/my-llama", "--context", "4096", "--license", "llama2")
    assert out.returncode == 0
    assert alias_hub_id("llama-2-7b") == "me/my-llama"  # the user's alias wins
    assert json.loads(invoke("zoo", "aliases", "--json").stdout)["llama-2-7b"]["origin"] == "user"
    bad = invoke("zoo", "alias", "x", "not a hub id")
    assert bad.returncode == 2 and "not a Hub id" in bad.stderr


def test_resolve_model_finds_zoo_entries_by_name_and_hub_id(home, extended):
    from pizoo.resolve import resolve_model
    from pizoo.zoo import Zoo

    zoo = Zoo()
    zoo.register_folder(extended)
    hit = resolve_model("tiny-ext", allow_download=False)
    assert hit.source == "zoo" and hit.path == (extended / "hf").resolve()
    pulled = home / "models" / "HuggingFaceTB--SmolLM2-135M"
    shutil.copytree(extended / "hf", pulled)
    zoo.register_folder(pulled, name="HuggingFaceTB/SmolLM2-135M", source="hub",
                        hub={"repo_id": "HuggingFaceTB/SmolLM2-135M", "revision": "main", "commit": "1" * 40})
    for spec in ("HuggingFaceTB/SmolLM2-135M", "smollm2-135m"):  # Hub id, and the alias naming it
        hit = resolve_model(spec, allow_download=False)
        assert hit.source == "zoo" and hit.path == pulled.resolve() and hit.revision == "1" * 40


def test_corrupt_index_is_a_one_line_error(home):
    home.mkdir(parents=True)
    (home / "zoo.json").write_text("{not json")
    out = invoke("zoo", "list")
    assert out.returncode == 2 and "zoo.json: invalid JSON" in out.stderr and len(out.stderr.splitlines()) == 1


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pizoo.zoo import Zoo
    tag, n, root, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.005)
    zoo = Zoo()
    for i in range(n):
        zoo.register_folder(root / f"{tag}-{i}", name=f"{tag}-{i}")
""")


def test_two_concurrent_writers_lose_no_entry(home, tmp_path):
    n = 25
    for tag in ("a", "b"):
        for i in range(n):
            folder = tmp_path / "models" / f"{tag}-{i}"
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(json.dumps({"model_type": "llama", "i": i, "tag": tag}))
    go = tmp_path / "go"
    env = {**os.environ, "PIZOO_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, tag, str(n), str(tmp_path / "models"), str(go)], env=env)
             for tag in ("a", "b")]
    go.touch()  # both start registering at the same moment
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    from pizoo.zoo import Zoo

    names = {e["name"] for e in Zoo().list()}
    assert names == {f"{tag}-{i}" for tag in ("a", "b") for i in range(n)}
    assert not list(home.glob(".zoo.json.*.tmp"))  # no temporary file left behind


def _lock_waiters(lock: Path) -> int:
    """How many processes wait for an flock on `lock` (/proc/locks marks blocked requests with '->')."""
    inode = lock.stat().st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for ln in lines if "->" in ln and ln.split()[-3].endswith(f":{inode}"))


REGISTER_ONE = "import sys; from pizoo.zoo import Zoo; Zoo().register_folder(sys.argv[1])"


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_two_writers_of_folders_with_the_same_name_both_get_an_entry(home, tmp_path):
    """Two processes registering different folders both named `model`: the free name is chosen under
    the lock, so one gets `model` and the other `model-2` (neither overwrites the other)."""
    import fcntl

    folders = []
    for parent in ("a", "b"):
        folder = tmp_path / parent / "model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "parent": parent}))
        folders.append(folder)
    home.mkdir(parents=True)
    lock_path = home / "zoo.lock"
    env = {**os.environ, "PIZOO_HOME": str(home)}
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # both writers queue behind this
        procs = [subprocess.Popen([sys.executable, "-c", REGISTER_ONE, str(f)], env=env) for f in folders]
        deadline = time.monotonic() + 60
        while _lock_waiters(lock_path) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    from pizoo.zoo import Zoo

    entries = {e["name"]: e["path"] for e in Zoo().list()}
    assert sorted(entries) == ["model", "model-2"]
    assert sorted(entries.values()) == sorted(str(f.resolve()) for f in folders)


def test_registering_again_keeps_a_publication_recorded_meanwhile(home, extended):
    """A re-registration built before another process recorded a push must not drop that publication."""
    from pizoo.zoo import Zoo, build_entry

    zoo = Zoo()
    entry = zoo.register_folder(extended)
    stale = build_entry(extended, name=entry["name"], previous=entry)  # built before the push below
    zoo.record_publication(extended, {"repo_id": "alice/x", "commit": "c" * 40})
    zoo.register(stale)
    assert [p["repo_id"] for p in zoo.get(entry["name"])["published"]] == ["alice/x"]


def test_shipped_alias_shapes_are_the_planners_known_bases():
    """One table: every shipped alias with a [NAME.shape] is a base the planner knows, found by alias
    and by Hub id, and its shapes give the parameter count its name states (within 15%)."""
    import re

    from pizoo.plan import config_from_known, known_base, known_bases
    from pizoo.zoo import shipped_aliases

    aliases, bases = shipped_aliases(), known_bases()
    assert set(bases) == {name for name, a in aliases.items() if "shape" in a}
    assert {"llama-2-7b", "mistral-7b", "smollm2-135m", "qwen2-7b"} <= set(bases)
    for name, entry in bases.items():
        assert entry["hub_id"] == aliases[name]["hub_id"] and entry["context"] == aliases[name]["context"]
        assert known_base(entry["hub_id"].upper())[0] == name
        for other in entry["also"]:
            assert known_base(other)[0] == name
        cfg = config_from_known(entry)
        size = re.search(r"-(\d+(?:\.\d+)?)([mb])(?:-|$)", name)
        # Phi's names state no size; Microsoft's model cards give 3.8B for all three. Gemma 2 2B's card
        # gives 2.6B (its 256k-token embedding is 0.6B of it).
        cards = {"phi-3-mini-4k": 3.8e9, "phi-3.5-mini": 3.8e9, "phi-4-mini": 3.8e9, "gemma-2-2b": 2.6e9}
        stated = cards.get(name) or float(size.group(1)) * (1e6 if size.group(2) == "m" else 1e9)
        assert abs(cfg.num_params() / stated - 1) < 0.15, (name, cfg.num_params(), stated)
