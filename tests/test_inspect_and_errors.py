"""`pizoo inspect` on every variant, and every kind of bad input giving one line and exit code 2."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from typer.testing import CliRunner

from pizoo import __version__
from pizoo.cli import app
from pizoo.config import RopeConfig

runner = CliRunner()

EXPECTED = {
    # variant: (architecture, kv heads, tied, tokenizer kind)
    "llama": ("llama", 4, False, "sentencepiece (bpe)"),
    "llama-gqa-tied": ("llama", 2, True, "bpe (byte-level)"),
    "mistral": ("mistral", 2, False, "bpe (byte-level)"),
    "qwen2": ("qwen2", 2, False, "bpe (byte-level)"),
}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version_and_grouped_help():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"pizoo {__version__}"
    r = invoke("--help")
    assert r.exit_code == 0
    assert "Models and checkpoints" in r.output and "inspect" in r.output


def test_inspect_json_every_variant(tiny_variant):
    from pizoo.checkpoint import open_checkpoint

    r = invoke("inspect", tiny_variant, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    arch, kv, tied, tok = EXPECTED[tiny_variant.name]
    ckpt = open_checkpoint(tiny_variant)
    expected_params = sum(t.numel() for t in ckpt.load_state_dict().values())
    assert info["format"] == "hf"
    assert info["architecture"] == arch
    assert info["params"] == expected_params
    assert info["dtype"] == "float32"
    assert info["context_length"] == 64 and info["original_context_length"] == 64
    assert info["rope"] == {"type": "none", "factor": 1.0, "theta": 10000.0, "original_context": None}
    assert info["kv_heads"] == kv and info["tied_embeddings"] is tied
    assert info["tokenizer"] == tok
    assert info["files"]["model.safetensors"] == (tiny_variant / "model.safetensors").stat().st_size


@pytest.mark.parametrize("rope,keys", [
    (RopeConfig(type="yarn", factor=4.0, original_context=64), {"beta_fast": 32.0, "beta_slow": 1.0}),
    (RopeConfig(type="llama3", factor=4.0, original_context=64), {"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    (RopeConfig(type="linear", factor=4.0, original_context=64), {}),
    (RopeConfig(type="ntk", factor=4.0, original_context=64), {}),
])
def test_inspect_reports_scaling(tiny_model_factory, rope, keys):
    path = tiny_model_factory(f"inspect-{rope.type}", variant="llama-gqa-tied", rope=rope, max_position_embeddings=256)
    info = json.loads(invoke("inspect", path, "--json").output)
    assert info["context_length"] == 256 and info["original_context_length"] == 64
    assert info["rope"]["type"] == rope.type and info["rope"]["factor"] == 4.0 and info["rope"]["theta"] == 10000.0
    for k, v in keys.items():
        assert info["rope"][k] == v
    text = invoke("inspect", path)
    assert text.exit_code == 0 and rope.type in text.output and "256" in text.output


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file or field, exit code 2, no traceback.


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert out.startswith("error: "), out
    assert len(out.splitlines()) == 1, out
    assert "Traceback" not in out
    for n in needles:
        assert n in out, out


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_path():
    assert_one_line_error(invoke("inspect", "/nonexistent/model"), "/nonexistent/model")


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_non_rope_model(tiny_llama, model_type):
    edit_config(tiny_llama, model_type=model_type, architectures=["GPT2LMHeadModel"])
    assert_one_line_error(invoke("inspect", tiny_llama), "config.json", model_type, "rotary")


def test_unsupported_architecture(tiny_llama):
    edit_config(tiny_llama, model_type="gemma", architectures=["GemmaForCausalLM"])
    assert_one_line_error(invoke("inspect", tiny_llama), "config.json", "gemma")


def test_partial_rotary(tiny_llama):
    edit_config(tiny_llama, partial_rotary_factor=0.5)
    assert_one_line_error(invoke("inspect", tiny_llama), "partial_rotary_factor")


def test_missing_field(tiny_llama):
    edit_config(tiny_llama, hidden_size=None)
    assert_one_line_error(invoke("inspect", tiny_llama), "config.json", "hidden_size")


def test_contradictory_fields(tiny_llama):
    edit_config(tiny_llama, rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert_one_line_error(invoke("inspect", tiny_llama), "rope_theta")
    edit_config(tiny_llama, rope_parameters=None, rope_scaling={"type": "linear", "rope_type": "yarn", "factor": 2.0})
    assert_one_line_error(invoke("inspect", tiny_llama), "rope_scaling", "disagree")


def test_unknown_rope_type(tiny_llama):
    edit_config(tiny_llama, rope_scaling={"rope_type": "magic", "factor": 2.0}, rope_parameters=None)
    assert_one_line_error(invoke("inspect", tiny_llama), "rope_scaling", "magic")


def test_invalid_json(tiny_llama):
    (tiny_llama / "config.json").write_text("{not json")
    assert_one_line_error(invoke("inspect", tiny_llama), "config.json", "invalid JSON")


def test_truncated_safetensors(tiny_llama):
    f = tiny_llama / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    assert_one_line_error(invoke("inspect", tiny_llama), "model.safetensors", "truncated")


def test_corrupt_safetensors_header(tiny_llama):
    f = tiny_llama / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"#" * n
    f.write_bytes(bytes(data))
    assert_one_line_error(invoke("inspect", tiny_llama), "model.safetensors", "corrupt")


def test_empty_safetensors(tiny_llama):
    (tiny_llama / "model.safetensors").write_bytes(b"")
    assert_one_line_error(invoke("inspect", tiny_llama), "model.safetensors")


def test_shape_disagrees_with_config(tiny_llama):
    edit_config(tiny_llama, intermediate_size=96)
    assert_one_line_error(invoke("inspect", tiny_llama), "mlp", "shape", "config.json")


def test_tied_flag_wrong(tiny_llama):
    edit_config(tiny_llama, tie_word_embeddings=False)
    from pizoo.checkpoint import open_checkpoint
    from pizoo.checkpoint import write_checkpoint

    ckpt = open_checkpoint(tiny_llama)
    kept = [(n, t) for n, t in ckpt.iter_tensors() if n != "lm_head.weight"]
    out = tiny_llama.parent / "nohead"
    write_checkpoint(out, ckpt.config, kept, copy_files_from=tiny_llama)
    edit_config(out, tie_word_embeddings=False)
    assert_one_line_error(invoke("inspect", out), "lm_head.weight", "tie_word_embeddings")


def test_pickle_only_checkpoint_refused(tiny_llama):
    (tiny_llama / "model.safetensors").unlink()
    (tiny_llama / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_one_line_error(invoke("inspect", tiny_llama), "pytorch_model.bin", "safetensors")


def test_missing_shard(tiny_llama, tmp_path):
    from pizoo.checkpoint import open_checkpoint, write_checkpoint

    ckpt = open_checkpoint(tiny_llama)
    out = write_checkpoint(tmp_path / "sharded", ckpt.config, ckpt.iter_tensors(), max_shard_bytes=20_000,
                           copy_files_from=tiny_llama)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert_one_line_error(invoke("inspect", out), victim.name, "does not exist")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("inspect", tmp_path / "empty"), "empty")


def test_non_gguf_file_named_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text('{"model_type": "llama"}')
    assert_one_line_error(invoke("inspect", fake), "model.gguf", "not a GGUF file")
    assert_one_line_error(invoke("import", fake, "--out", tmp_path / "hf"), "model.gguf", "GGUF magic")
    assert_one_line_error(invoke("import", tmp_path, "--out", tmp_path / "hf"), "is a folder")
    assert not (tmp_path / "hf").exists()


def test_copy_is_independent(tiny_llama, tiny_model_factory):
    """The tiny_llama fixture is a private copy: edits above never leak into the shared model."""
    shared = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    assert shared != tiny_llama
    assert json.loads((shared / "config.json").read_text())["model_type"] == "llama"
    shutil.rmtree(tiny_llama)
