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


# --------------------------------------------------------------------------------------------
# The streaming safetensors writer


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    big = torch.randn(4, 8, generator=g)
    return {
        "model.layers.0.w": base.to(torch.bfloat16),
        "f32": base, "f16": base.half(), "f64": base.double(),
        "i64": torch.arange(-6, 6), "i32": torch.arange(7, dtype=torch.int32), "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i8": torch.arange(-4, 4, dtype=torch.int8), "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
        "scalar": torch.tensor(2.5), "scalar_int": torch.tensor(7), "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "transposed": big.t(),  # not contiguous
        "offset_view": big[1:3, 2:],  # a view with a storage offset
        "ümlaut/α\n\"q\\": torch.ones(2),  # JSON escaping and UTF-8 as safetensors writes them
        "A": torch.ones(1), "a": torch.zeros(1),
    }


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("with_layout", [False, True])
def test_streaming_writer_is_byte_identical_to_save_file(tmp_path, with_layout):
    """Both modes (layout up front: tensors arrive in any order; no layout: temp file + copy_file_range)
    write exactly the bytes of safetensors' save_file, which loads back identical tensors and metadata."""
    import os
    import stat

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from pizoo.checkpoint import read_safetensors_header, write_safetensors

    tensors = _all_dtypes()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"),
              metadata={"format": "pt"})
    items = list(tensors.items())
    layout = [(k, v.dtype, v.shape) for k, v in items] if with_layout else None
    old = os.umask(0o022)
    try:
        out = write_safetensors(tmp_path / "out.safetensors", reversed(items) if with_layout else items, layout=layout)
    finally:
        os.umask(old)
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "ref.safetensors"]  # no temp files
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    back = load_file(str(out))
    assert back.keys() == tensors.keys()
    assert all(_bytes_equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert set(read_safetensors_header(out)) == set(tensors)


def test_sharded_checkpoint_shards_are_byte_identical_to_save_file(tiny_model_factory, tmp_path):
    from safetensors.torch import save_file

    ckpt = open_checkpoint(tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece"))
    out = write_checkpoint(tmp_path / "sharded", ckpt.config, ckpt.iter_tensors(), max_shard_bytes=30_000)
    back = open_checkpoint(out)
    assert len(back.files) > 2
    for i, shard in enumerate(back.files):
        save_file({n: t for n, t in back.iter_tensors() if back.tensors[n].file == shard},
                  str(tmp_path / f"ref{i}"), metadata={"format": "pt"})
        assert shard.read_bytes() == (tmp_path / f"ref{i}").read_bytes(), shard.name


def _numpy_tensors(count: int, nbytes: int):
    """Fresh tensors whose memory numpy allocates, so tracemalloc sees it (torch's allocator it does not)."""
    import numpy as np

    for i in range(count):
        yield f"t{i:02d}", torch.from_numpy(np.full(nbytes // 4, float(i), dtype=np.float32))


@pytest.mark.parametrize("how", ["write_checkpoint", "no_layout", "layout"])
def test_streaming_writer_holds_one_tensor_at_a_time(tmp_path, how):
    """16 tensors of 4 MiB into one file: the peak of traced memory stays near one or two tensors, where
    buffering the shard (what write_checkpoint did through save_file) needs all 64 MiB."""
    import tracemalloc

    from pizoo.checkpoint import write_safetensors

    count, each = 16, 4 << 20
    cfg = ModelConfig(architecture="llama", vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=256)
    tracemalloc.start()
    try:
        if how == "write_checkpoint":
            path = write_checkpoint(tmp_path / "ckpt", cfg, _numpy_tensors(count, each)) / SINGLE_FILE
        else:
            layout = [(n, torch.float32, (each // 4,)) for n in (f"t{i:02d}" for i in range(count))]
            path = write_safetensors(tmp_path / "x.safetensors", _numpy_tensors(count, each),
                                     layout=layout if how == "layout" else None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * each, f"peak {peak / 2**20:.1f} MiB for {count} tensors of {each / 2**20:.0f} MiB"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == [f"t{i:02d}" for i in range(count)]
        assert all(float(f.get_slice(f"t{i:02d}")[:1][0]) == float(i) for i in range(count))


@pytest.mark.parametrize("with_layout", [False, True])
def test_streaming_writer_failure_leaves_nothing(tmp_path, with_layout):
    from pizoo.checkpoint import SafetensorsWriter, write_safetensors

    layout = [(f"t{i}", torch.float32, (1000,)) for i in range(4)] if with_layout else None

    def failing():
        for i in range(4):
            if i == 2:
                raise RuntimeError("source died")
            yield f"t{i}", torch.ones(1000)

    target = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError, match="source died"):
        write_safetensors(target, failing(), layout=layout)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PizooError, match="complex64") as e:
        write_safetensors(target, [("t0", torch.ones(1000)), ("t1", torch.ones(1000, dtype=torch.complex64))],
                          layout=None)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PizooError, match="written twice"):
        write_safetensors(target, [("t0", torch.ones(1000)), ("t0", torch.ones(1000))], layout=layout)
    assert list(tmp_path.iterdir()) == []
    if with_layout:
        with pytest.raises(PizooError, match=r"'t1' is F32 \[999\] but the layout says F32 \[1000\]"):
            write_safetensors(target, [("t1", torch.ones(999))], layout=layout)
        with pytest.raises(PizooError, match="'t3' is in the layout but was never written"):
            write_safetensors(target, [(f"t{i}", torch.ones(1000)) for i in range(3)], layout=layout)
        with pytest.raises(PizooError, match="'zz' is not in the layout"):
            write_safetensors(target, [("zz", torch.ones(1000))], layout=layout)
        assert list(tmp_path.iterdir()) == []
    # The writer never touches an existing file at the path until it is complete.
    target.write_bytes(b"old")
    w = SafetensorsWriter(target, layout)
    w.add("t0", torch.ones(1000))
    w.abort()
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [target.name]
