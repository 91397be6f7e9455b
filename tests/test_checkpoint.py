"""Checkpoint I/O: bit-exact round trips (single file and sharded), dtypes kept, index written,
atomic writes, both transformers RoPE conventions read, and pizoo's files load in transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pizoo.checkpoint import INDEX_FILE, SINGLE_FILE, open_checkpoint, write_checkpoint
from pizoo.config import ModelConfig, RopeConfig
from pizoo.errors import PizooError


def _tensors_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        # Compare raw bytes: bit-exact, NaN-safe.
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_and_sharded_round_trip_bit_exact(tiny_model_factory, tmp_path, dtype):
    src = tiny_model_factory(f"rt-{dtype}", variant="qwen2", tokenizer="bpe", dtype=dtype)
    ckpt = open_checkpoint(src)
    original = ckpt.load_state_dict()
    assert all(t.dtype == dtype for t in original.values())

    single = write_checkpoint(tmp_path / "single", ckpt.config, ckpt.iter_tensors(), copy_files_from=src)
    assert (single / SINGLE_FILE).is_file() and not (single / INDEX_FILE).exists()
    _tensors_equal(original, open_checkpoint(single).load_state_dict())

    sharded = write_checkpoint(tmp_path / "sharded", ckpt.config, open_checkpoint(single).iter_tensors(),
                               copy_files_from=single, max_shard_bytes=20_000)
    index = json.loads((sharded / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    back = open_checkpoint(sharded)
    _tensors_equal(original, back.load_state_dict())
    assert back.config.to_hf_dict() == ckpt.config.to_hf_dict()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (sharded / name).read_bytes() == (src / name).read_bytes()


def test_reading_is_lazy(tiny_model_factory):
    """Opening reads headers only; tensors come one at a time from memory-mapped files."""
    src = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    ckpt = open_checkpoint(src)
    it = ckpt.iter_tensors()
    name, first = next(it)
    assert name in ckpt.tensors and first.shape == ckpt.tensors[name].shape
    it.close()


def test_write_is_atomic_on_failure(tiny_model_factory, tmp_path):
    src = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    ckpt = open_checkpoint(src)

    def failing():
        for i, item in enumerate(ckpt.iter_tensors()):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(out, ckpt.config, failing(), max_shard_bytes=10_000)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_refuses_to_overwrite_without_flag(tiny_model_factory, tmp_path):
    src = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    ckpt = open_checkpoint(src)
    write_checkpoint(tmp_path / "o", ckpt.config, ckpt.iter_tensors())
    with pytest.raises(PizooError, match="already exists"):
        write_checkpoint(tmp_path / "o", ckpt.config, ckpt.iter_tensors())
    write_checkpoint(tmp_path / "o", ckpt.config, ckpt.iter_tensors(), overwrite=True)


BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 2048, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_v4_and_v5_conventions_parse_identically(scaling):
    v4 = {**BASE, "rope_theta": 500000.0, "rope_scaling": {**scaling, "type": scaling["rope_type"]}}
    v5 = {**BASE, "rope_parameters": {**scaling, "rope_theta": 500000.0}}
    a, b = ModelConfig.from_hf_dict(v4), ModelConfig.from_hf_dict(v5)
    assert a.rope == b.rope
    assert a.rope.type == scaling["rope_type"] and a.rope.theta == 500000.0


def test_written_config_loads_in_transformers_with_scaling(tiny_model_factory):
    transformers = pytest.importorskip("transformers")
    rope = RopeConfig(type="yarn", factor=4.0, original_context=64, beta_fast=16.0)
    path = tiny_model_factory("cfg-yarn", variant="llama-gqa-tied", tokenizer="bpe", rope=rope,
                              max_position_embeddings=256)
    raw = json.loads((path / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == "yarn" and raw["rope_scaling"]["original_max_position_embeddings"] == 64
    assert raw["rope_parameters"]["rope_type"] == "yarn"
    hf = transformers.AutoConfig.from_pretrained(path)
    assert hf.max_position_embeddings == 256
    params = hf.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0 and params["beta_fast"] == 16.0
    assert params["original_max_position_embeddings"] == 64


def test_ntk_round_trips_as_rope_theta(tiny_model_factory):
    rope = RopeConfig(type="ntk", factor=4.0, original_context=64, theta=10000.0)
    path = tiny_model_factory("cfg-ntk", variant="llama", tokenizer="sentencepiece", rope=rope,
                              max_position_embeddings=256)
    raw = json.loads((path / "config.json").read_text())
    assert raw["rope_scaling"] is None
    assert math.isclose(raw["rope_theta"], 10000.0 * 4.0 ** (16 / 14))
    back = open_checkpoint(path).config.rope
    assert back.type == "ntk" and back.theta == 10000.0 and back.factor == 4.0


def test_dynamic_keeps_original_length_for_transformers(tiny_model_factory):
    rope = RopeConfig(type="dynamic", factor=4.0, original_context=64)
    path = tiny_model_factory("cfg-dynamic", variant="llama", tokenizer="sentencepiece", rope=rope,
                              max_position_embeddings=256)
    raw = json.loads((path / "config.json").read_text())
    # transformers scales dynamic NTK against max_position_embeddings, so it must stay L.
    assert raw["max_position_embeddings"] == 64 and raw["pizoo"]["target_context"] == 256
    cfg = open_checkpoint(path).config
    assert cfg.original_context == 64 and cfg.context_length == 256


def test_written_files_get_normal_permissions(tiny_model_factory, tmp_path):
    """Artifacts are shared (multi-node file systems, other users): not the 0600/0700 of mkstemp."""
    import os
    import stat

    src = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    ckpt = open_checkpoint(src)
    old = os.umask(0o022)
    try:
        out = write_checkpoint(tmp_path / "perm", ckpt.config, ckpt.iter_tensors(), copy_files_from=src)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644


def test_longrope_writes_top_level_original_length_for_transformers_v4():
    """transformers v4 reads longrope's original length only from a top-level
    original_max_position_embeddings (else it takes max_position_embeddings and never applies the long
    factors below the target); v5 reads rope_parameters. Both must say L, and pizoo must read it back."""
    half = 8
    rope = RopeConfig(type="longrope", factor=4.0, original_context=64, short_factor=[1.0] * half,
                      long_factor=[1.0 + i for i in range(half)], attention_factor=1.0)
    cfg = ModelConfig(architecture="llama", vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=256, rope=rope)
    raw = cfg.to_hf_dict()
    assert raw["max_position_embeddings"] == 256
    assert raw["original_max_position_embeddings"] == 64
    assert raw["rope_scaling"]["original_max_position_embeddings"] == 64
    assert raw["rope_parameters"]["original_max_position_embeddings"] == 64
    back = ModelConfig.from_hf_dict(raw).rope
    assert (back.type, back.original_context, back.long_factor) == ("longrope", 64, rope.long_factor)
    # Other methods are unchanged: no top-level key.
    assert "original_max_position_embeddings" not in ModelConfig(
        **{**cfg.__dict__, "rope": RopeConfig().scaled("yarn", 4.0, 64)}).to_hf_dict()
