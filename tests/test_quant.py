"""The GGUF quant ladder and its quality, against llama.cpp itself (llama-cpp-python).

The oracle for every quantized file is llama.cpp's quantizer run by hand (`llama_model_quantize` on
the same f16 file with its default parameters): pizoo's files must be byte-identical to what it
makes, must load in llama.cpp with the extended n_ctx_train, and must keep the f16 file's RoPE keys,
rope_freqs tensor and lineage. Quality is measured by llama.cpp's logits.

The tiny model has hidden size 256 (the K-quant block) so attention and gate/up matrices take the
K-quant types, and an intermediate size of 320, so the ffn_down matrices (rows of 320) do not: for
those llama.cpp picks a fallback type itself, which pizoo reports by tensor name.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pizoo.config import RopeConfig
from pizoo.errors import PizooError
from pizoo.export.quantize import parse_gguf_types, quantize_gguf, write_ladder
from pizoo.families import FAMILIES

llama_cpp = pytest.importorskip("llama_cpp")

ORIGINAL, EXTENDED = 64, 256
LADDER = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs")


@pytest.fixture(scope="module")
def quant_model(tmp_path_factory) -> Path:
    from pizoo.synthetic import write_tiny_model

    rope = RopeConfig().scaled("llama3", EXTENDED / ORIGINAL, ORIGINAL)  # written as rope_freqs
    return write_tiny_model(tmp_path_factory.mktemp("quant") / "Tiny", variant="llama", tokenizer="bpe",
                            rope=rope, hidden_size=256, intermediate_size=320, num_heads=4, num_kv_heads=2,
                            head_dim=64, num_layers=2, max_position_embeddings=EXTENDED)


@pytest.fixture(scope="module")
def ladder(quant_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ladder")
    said: list[str] = []
    files = write_ladder(quant_model, out, ",".join(LADDER), say=said.append)
    return {"out": out, "files": {f.type: f for f in files}, "said": said}


def by_hand(src: Path, out: Path, qtype: str) -> Path:
    """What `llama-quantize SRC OUT TYPE` writes: llama.cpp's default parameters, the type set."""
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(p)) == 0
    return out


def metadata(path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    freqs = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    return {"fields": fields, "rope_freqs": np.array(freqs.data, dtype=np.float32),
            "types": {t.name: t.tensor_type.name for t in r.tensors}}


def test_every_type_is_made_named_the_hub_way_and_identical_to_llama_quantize(ladder, tmp_path):
    files = ladder["files"]
    assert list(files) == list(LADDER)
    names = {t: f.path.name for t, f in files.items()}
    assert names["q4_k_m"].endswith("-256-LLAMA3-Q4_K_M.gguf") and names["f16"].endswith("-256-LLAMA3-F16.gguf")
    assert sorted(p.name for p in ladder["out"].iterdir()) == sorted(names.values())  # no temporary left
    f16 = files["f16"].path
    for t in LADDER[1:]:
        assert files[t].made_by == "llama.cpp"
        theirs = by_hand(f16, tmp_path / f"{t}.gguf", t)
        assert files[t].path.read_bytes() == theirs.read_bytes(), t


def test_each_file_loads_in_llama_cpp_with_the_scaling_and_lineage_intact(ladder):
    files = ladder["files"]
    ref = metadata(files["f16"].path)
    keep = [k for k in ref["fields"] if k.startswith(("llama.", "general.", "pizoo.", "tokenizer."))
            and k not in ("general.file_type",)]
    assert any(k.startswith("llama.rope.") for k in keep)
    for t, f in files.items():
        meta = metadata(f.path)
        assert {k: meta["fields"].get(k) for k in keep} == {k: ref["fields"][k] for k in keep}, t
        np.testing.assert_array_equal(meta["rope_freqs"], ref["rope_freqs"])
        assert meta["types"]["rope_freqs.weight"] == "F32"
        llm = llama_cpp.Llama(str(f.path), n_ctx=64, verbose=False)
        try:
            assert llama_cpp.llama_model_n_ctx_train(llm.model) == EXTENDED, t
            assert llm.metadata["general.file_type"] == str(getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + t.upper())), t
        finally:
            llm.close()
    q4 = metadata(files["q4_k_m"].path)["types"]
    assert q4["blk.0.attn_q.weight"] == "Q4_K" and q4["blk.0.ffn_down.weight"] not in ("Q4_K", "Q6_K")


def test_fallback_tensors_are_reported_by_name(ladder):
    fallbacks = ladder["files"]["q4_k_m"].fallbacks
    assert {f["tensor"] for f in fallbacks} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert all(f["cols"] == 320 and f["block"] == 256 for f in fallbacks)
    assert any("q4_k_m" in line and "fallback" in line for line in ladder["said"])


def test_kld_of_the_reference_is_zero_and_q8_0_is_closer_than_q4_k_m(ladder, text_file, capfd):
    from pizoo.eval.llamacpp import evaluate_ggufs

    files = ladder["files"]
    reports = evaluate_ggufs([files[t].path for t in ("f16", "q8_0", "q4_k_m")], ctx=[EXTENDED],
                             reference=files["f16"].path, data=[str(text_file)], max_documents=1)
    by = {r["type"]: r["results"][0] for r in reports}
    assert set(by) == {"F16", "Q8_0", "Q4_K_M"}
    assert by["F16"]["kld"] == 0.0 and by["F16"]["top1"] == 1.0 and by["F16"]["ppl_ratio"] == 1.0
    assert 0 < by["Q8_0"]["kld"] < by["Q4_K_M"]["kld"]
    assert all(r["tokens"] == EXTENDED - 1 and np.isfinite(r["ppl"]) for r in by.values())
    sizes = {r["type"]: (r["bytes"], r["bpw"]) for r in reports}
    assert sizes["F16"][1] > sizes["Q8_0"][1] > sizes["Q4_K_M"][1] > 4
    # Tokenizing loads the vocabulary without a llama_context: a context over a vocabulary-only model
    # is sized against n_ctx_train 0 (llama.cpp reads the hyperparameters only with the weights).
    assert "n_ctx_train (0)" not in capfd.readouterr().err


GGUF_FAMILIES = [name for name, fam in FAMILIES.items() if not getattr(fam, "gguf_refusal", "")]


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_every_gguf_family_gets_a_ladder_identical_to_llama_quantize(family, tmp_path):
    """Each family pizoo writes as GGUF, yarn-scaled (the method every llama.cpp graph reads): the
    q4_k_m rung is llama.cpp's own bytes, loads with n_ctx_train at the extended length, and keeps the
    family's architecture and scaling keys."""
    from gguf import GGUFReader

    from pizoo.synthetic import write_tiny_model

    variant = next(iter(FAMILIES[family].tiny))
    rope = RopeConfig().scaled("yarn", EXTENDED / ORIGINAL, ORIGINAL)
    kv_heads = 4 if FAMILIES[family].tiny[variant].get("qkv_per_head") else 2  # GPT-NeoX: one k, v per head
    model = write_tiny_model(tmp_path / "Tiny", variant=variant, tokenizer="bpe", rope=rope, hidden_size=256,
                             intermediate_size=256, num_heads=4, num_kv_heads=kv_heads, head_dim=64, num_layers=1,
                             max_position_embeddings=EXTENDED)
    files = {f.type: f.path for f in write_ladder(model, tmp_path / "out", "f16,q4_k_m")}
    assert files["q4_k_m"].read_bytes() == by_hand(files["f16"], tmp_path / "hand.gguf", "q4_k_m").read_bytes()
    ref, quant = GGUFReader(files["f16"]), GGUFReader(files["q4_k_m"])
    arch = quant.fields["general.architecture"].contents()
    assert arch == FAMILIES[family].gguf.name
    assert quant.fields[f"{arch}.context_length"].contents() == EXTENDED

    def rope(reader):  # the scaling as the file carries it: keys (yarn) or per-frequency tables (longrope)
        keys = {k: f.contents() for k, f in reader.fields.items() if k.startswith(f"{arch}.rope.")}
        tables = {t.name: (t.tensor_type.name, np.array(t.data).tobytes()) for t in reader.tensors
                  if t.name.startswith("rope_")}
        return keys, tables

    keys, tables = rope(ref)
    assert keys.get(f"{arch}.rope.scaling.type") == "yarn" or tables, keys
    assert rope(quant) == (keys, tables)
    llm = llama_cpp.Llama(str(files["q4_k_m"]), n_ctx=64, verbose=False)
    try:
        assert llama_cpp.llama_model_n_ctx_train(llm.model) == EXTENDED
    finally:
        llm.close()


def test_bad_types_are_one_line_errors():
    for text, needle in (("f16,q4_z", "unknown GGUF type"), ("iq2_xs", "importance matrix"),
                         ("tq1_0", "ternary"), (" , ", "empty")):
        with pytest.raises(PizooError) as e:
            parse_gguf_types(text)
        assert needle in str(e.value) and "\n" not in str(e.value)
    assert parse_gguf_types("F16, q4_K_M,f16") == ("f16", "q4_k_m")


def test_quantizer_failure_names_the_type_and_tensor_and_leaves_nothing(ladder, tmp_path):
    """llama.cpp validates tensor data while quantizing: a NaN in the f16 file makes it fail."""
    from gguf import GGUFReader

    bad = tmp_path / "bad-F16.gguf"
    shutil.copy(ladder["files"]["f16"].path, bad)
    t = next(t for t in GGUFReader(bad).tensors if t.name == "blk.1.attn_k.weight")
    with open(bad, "r+b") as f:
        f.seek(int(t.data_offset))
        f.write(np.array([np.nan] * 8, dtype=np.float16).tobytes())
    with pytest.raises(PizooError) as e:
        quantize_gguf(bad, tmp_path / "out-Q4_K_M.gguf", "q4_k_m")
    msg = str(e.value)
    assert "Q4_K_M" in msg and "blk.1.attn_k.weight" in msg and "\n" not in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-F16.gguf"]


def test_cli_ladder_and_missing_extra(quant_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pizoo.cli import app

    monkeypatch.setenv("PIZOO_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(quant_model), "--to", "gguf", "--gguf-dtype", "f16,q4_0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name.rsplit("-", 1)[1] for p in out.iterdir()) == ["F16.gguf", "Q4_0.gguf"]
    again = runner.invoke(app, ["convert", str(quant_model), "--to", "gguf", "--dtype", "f16,q4_0", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    r = runner.invoke(app, ["convert", str(quant_model), "--to", "gguf", "--dtype", "q4_k_m,iq1_s",
                            "--out", str(tmp_path / "o3")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "iq1_s" in r.output
    # Without llama-cpp-python (as after `pip install pizoo` without the extra): the error names it.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    r = runner.invoke(app, ["convert", str(quant_model), "--to", "gguf", "--dtype", "f16,q4_k_m",
                            "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "pizoo[quant]" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o2").exists()


def test_eval_command_with_the_llama_cpp_backend(ladder, quant_model, text_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pizoo.cli import app

    monkeypatch.setenv("PIZOO_HOME", str(tmp_path / "home"))
    files = ladder["files"]
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(files["q4_k_m"].path), "--backend", "llama.cpp", "--reference",
                            str(files["f16"].path), "--ctx", "128", "--data", str(text_file), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    (res,) = report["files"][0]["results"]
    assert report["backend"] == "llama.cpp" and res["ctx"] == 128 and res["kld"] > 0 and 0 < res["top1"] <= 1
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith(files["q4_k_m"].path.name))
    assert f"{res['kld']:.6f}" in row and "128" in row
    for args, needle in ((["eval", str(quant_model), "--backend", "llama.cpp"], "measures a .gguf file"),
                         (["eval", str(quant_model), "--reference", str(files["f16"].path)], "--backend llama.cpp"),
                         (["eval", str(files["f16"].path), "--backend", "onnx"], "--backend onnx")):
        r = runner.invoke(app, args)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output


def test_a_bf16_model_beyond_f16_range_gets_its_ladder_from_bf16(tmp_path):
    """A type the source cannot produce: f16 of a bf16 model with a weight past 65504 is refused, naming
    the tensor and leaving nothing; the quants alone are made from a bf16 intermediate, which holds it."""
    import torch
    from safetensors.torch import load_file, save_file

    from pizoo.synthetic import write_tiny_model

    model = write_tiny_model(tmp_path / "Big", variant="llama", tokenizer="bpe", dtype=torch.bfloat16)
    weights = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][0, 0] = 1e5
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(PizooError) as e:
        write_ladder(model, out, "f16,q4_k_m")
    assert name in str(e.value) and "bf16" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() or not any(out.iterdir())
    (q4,) = write_ladder(model, out, "q4_k_m")
    assert sorted(p.name for p in out.iterdir()) == [q4.path.name]
    llm = llama_cpp.Llama(str(q4.path), n_ctx=64, verbose=False)
    llm.close()


def test_one_quant_alone_leaves_no_intermediate(quant_model, tmp_path):
    files = write_ladder(quant_model, tmp_path / "x.gguf", "q4_k_m")
    assert [f.path.name for f in files] == ["x.gguf"] and os.listdir(tmp_path) == ["x.gguf"]
    assert json.loads(json.dumps(files[0].to_dict()))["made_by"] == "llama.cpp"


UNTRAINED_YARN = """\
name = "yarn-untrained"
method = "yarn"
citation = "Peng, Quesnelle, Fan, Shippole. YaRN: Efficient Context Window Extension of Large Language Models. arXiv:2309.00071 (2023)"

[train]
enabled = false
"""


def test_sigkill_in_the_ladder_is_resumed_without_redoing_finished_files(tiny_model_factory, text_file, tmp_path,
                                                                          monkeypatch):
    """One killed `pizoo extend` (training-free recipe, quick eval: the ladder is the work) and its rerun."""
    base = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    recipe = tmp_path / "yarn-untrained.toml"
    recipe.write_text(UNTRAINED_YARN)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pizoo.cli", "extend", str(base), "--ctx", "256", "--recipe", str(recipe),
           "--out", str(out), "--formats", "hf,gguf", "--gguf-dtype", "f16,q8_0,q4_k_m", "--eval", "quick",
           "--eval-ctx", "256", "--data", str(text_file)]
    env = dict(os.environ, PIZOO_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    env.pop("PIZOO_TEST_KILL_IN_STAGE", None)
    # Renames inside convert-gguf: the f16 file (1), run.json recording it (2), the q8_0 file (3).
    killed = subprocess.run(cmd, env={**env, "PIZOO_TEST_KILL_IN_STAGE": "convert-gguf:3"}, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    gguf = out / "gguf"
    (f16,) = [p for p in gguf.glob("*.gguf")]
    assert f16.name.endswith("-F16.gguf") and list(gguf.glob(".*.tmp"))  # q8_0's temporary, killed mid-ladder
    stamp = (f16.stat().st_ino, f16.stat().st_mtime_ns)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (f16.stat().st_ino, f16.stat().st_mtime_ns) == stamp
    assert "gguf f16" in rerun.stderr and "kept (already made)" in rerun.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["stages_run"] == ["convert-gguf", "register"]
    files = run["stages"]["convert-gguf"]["result"]["files"]
    assert [(f["type"], f["reused"]) for f in files] == [("f16", True), ("q8_0", False), ("q4_k_m", False)]
    assert sorted(p.name.rsplit("-", 1)[1] for p in gguf.glob("*.gguf")) == ["F16.gguf", "Q4_K_M.gguf", "Q8_0.gguf"]
    assert set(run["units"]["convert-gguf"]) == {p.name for p in gguf.iterdir()}
    ladder_is_in_the_zoo_and_pushed_with_its_table(out, tmp_path / "home", monkeypatch)


def ladder_is_in_the_zoo_and_pushed_with_its_table(out: Path, home: Path, monkeypatch) -> None:
    """The zoo records every rung with its sha256; `pizoo push` uploads every rung byte for byte and
    the card carries the llama.cpp quality table (one row per file) and a recommendation line."""
    import hashlib

    from hub_server import HubServer, TokenInfo
    from pizoo.hub import push

    ggufs = {p.name: p for p in (out / "gguf").glob("*.gguf")}
    entry = next(iter(json.loads((home / "zoo.json").read_text())["entries"].values()))
    recorded = {Path(f["path"]).name: f["sha256"] for f in entry["formats"]["gguf"]["files"]}
    assert recorded == {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in ggufs.items()}

    token = "hf_pizooTestWriteToken0123456789"
    server = HubServer({token: TokenInfo("alice", write=True)}).start()
    try:
        for k, v in {"HF_ENDPOINT": server.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
                     "PIZOO_HOME": str(home)}.items():
            monkeypatch.setenv(k, v)
        result = push(out, "alice/tiny-ladder", force=True)  # quick eval: no gate
        remote = server.state.files("alice/tiny-ladder")
    finally:
        server.stop()
    pushed = {f.path_in_repo: f.source.name for f in result.files if f.path_in_repo.endswith(".gguf")}
    assert sorted(n.rsplit("-", 1)[1] for n in pushed) == ["F16.gguf", "Q4_K_M.gguf", "Q8_0.gguf"]
    assert all(remote[repo] == ggufs[local].read_bytes() for repo, local in pushed.items())
    card = remote["README.md"].decode()
    table = [ln for ln in card.split("## GGUF quants", 1)[1].splitlines() if ln.startswith("| `")]
    assert sorted(ln.split("`")[1] for ln in table) == sorted(pushed)
    assert "Recommendation: " in card
