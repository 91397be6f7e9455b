"""GGUF export and import, checked against the real llama.cpp (llama-cpp-python).

The oracle is llama.cpp itself: every file pizoo writes is loaded by llama.cpp, and its logits over a
sequence longer than the original context (64) and shorter than the extended one (256) must match
pizoo's forward on the HF model (which equals transformers'). The tiny models have their q/k weights
scaled up so attention is sharp: with near-uniform attention a dropped RoPE scaling would change the
logits by less than the tolerance, and the test could not fail (test_parity_can_fail checks this).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pizoo.checkpoint import open_checkpoint, write_checkpoint
from pizoo.config import ModelConfig, RopeConfig
from pizoo.errors import PizooError
from pizoo.export.gguf import export_gguf, identify_pre, quantize_q8_0
from pizoo.gguf_import import import_gguf
from pizoo.model import load_model
from pizoo.rope import RotaryEmbedding
from pizoo.synthetic import random_model, sample_text, tiny_config, write_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

ORIGINAL, EXTENDED, EVAL_TOKENS = 64, 256, 150
QK_SHARPEN = 12.0  # q/k weight multiplier that makes RoPE matter in a tiny random model
# Relative max abs difference max|llama.cpp - pizoo| / max|pizoo| allowed per GGUF type, with
# llama.cpp's KV cache in f32. Measured over 3 shapes x 6 methods: f32 <= 7.2e-7, f16 <= 7.4e-4,
# bf16 <= 5.0e-3, q8_0 <= 1.7e-2 (the weights' rounding). With llama.cpp's default f16 KV cache, f32
# weights stay within the 2e-3 (measured <= 4.3e-4; test_default_kv_cache_within_2e3).
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}
DEFAULT_KV_TOLERANCE = 2e-3

# Shapes: llama with grouped-query attention (untied head), llama with a tied head, qwen2 (q/k/v bias).
ARCHS = {
    "llama-gqa": dict(variant="llama", num_kv_heads=2, tokenizer="sentencepiece"),
    "llama-tied": dict(variant="llama-gqa-tied", tokenizer="bpe"),
    "qwen2": dict(variant="qwen2", tokenizer="bpe"),
}


def clex_rope() -> RopeConfig:
    """A baked CLEX config as pizoo.clex writes it: longrope, short factors one, long = CLEX factors."""
    long = [1.0, 1.05, 1.2, 1.5, 2.0, 2.7, 3.4, 4.0]
    return RopeConfig(type="longrope", method="clex", theta=10000.0, factor=EXTENDED / ORIGINAL,
                      original_context=ORIGINAL, short_factor=[1.0] * 8, long_factor=long, attention_factor=1.0)


def make_rope(method: str) -> RopeConfig:
    s = EXTENDED / ORIGINAL
    if method == "none":
        return RopeConfig()
    if method == "clex":
        return clex_rope()
    if method == "yarn-attn":
        return RopeConfig().scaled("yarn", s, ORIGINAL, attention_factor=1.3)
    if method == "yarn-beta":
        return RopeConfig().scaled("yarn", s, ORIGINAL, beta_fast=16.0, beta_slow=2.0)
    if method == "longrope":
        return RopeConfig(type="longrope", theta=10000.0, factor=s, original_context=ORIGINAL,
                          short_factor=[1.0] * 8, long_factor=[1.0 + 0.4 * i for i in range(8)])
    return RopeConfig().scaled(method, s, ORIGINAL)


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, tuple[Path, int, int, int]]:
    """One trained tokenizer of each kind: folder, vocab size, bos id, eos id."""
    out = {}
    for kind in ("bpe", "sentencepiece"):
        d = tmp_path_factory.mktemp(f"tok-{kind}")
        out[kind] = (d, *write_tokenizer(d, kind))
    return out


@pytest.fixture(scope="session")
def sharp_model(tmp_path_factory, tokenizer_dirs):
    """sharp_model(arch, method, dtype=float32) -> HF folder of a tiny model with sharp attention."""
    root = tmp_path_factory.mktemp("gguf-models")

    def make(arch: str, method: str, dtype: torch.dtype = torch.float32) -> Path:
        path = root / f"{arch}-{method}-{str(dtype).removeprefix('torch.')}"
        if path.exists():
            return path
        spec = dict(ARCHS[arch])
        variant, kind = spec.pop("variant"), spec.pop("tokenizer")
        tok_dir, vocab, bos, eos = tokenizer_dirs[kind]
        rope = make_rope(method)
        cfg = tiny_config(variant, vocab_size=vocab, rope=rope, bos=bos, eos=eos,
                          max_position_embeddings=EXTENDED if rope.is_scaled or method == "dynamic" else ORIGINAL,
                          **spec)
        if rope.is_scaled:
            cfg.raw["pizoo"] = {"rope_method": rope.method, "target_context": EXTENDED,
                                "base_model": "pizoo-tests/Tiny-Llama"}
        cfg.torch_dtype = str(dtype).removeprefix("torch.")
        model = random_model(cfg, seed=len(path.name))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.mul_(QK_SHARPEN)
        write_checkpoint(path, cfg, model.to(dtype).hf_state_dict().items(), copy_files_from=tok_dir,
                         generation_config={"bos_token_id": bos, "eos_token_id": eos})
        return path

    return make


def eval_ids(folder: Path) -> list[int]:
    from pizoo.tokenizer import load_tokenizer

    ids = load_tokenizer(folder).encode(sample_text(20_000)).ids[:EVAL_TOKENS]
    assert len(ids) == EVAL_TOKENS
    return ids


def pizoo_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model = load_model(folder)
    with torch.no_grad():
        return model.forward_logits(torch.tensor([ids]))[0].numpy()


def llama_cpp_logits(gguf: Path, ids: list[int], kv_cache: str = "f32") -> tuple[np.ndarray, int]:
    """llama.cpp's logits for `ids` and its n_ctx_train. The KV cache is f32 unless asked (llama.cpp's
    default f16 cache rounds K and V, which sharp attention turns into ~5e-4 relative error)."""
    kv = {"f32": 0, "f16": 1}[kv_cache]  # GGML_TYPE_F32, GGML_TYPE_F16
    llm = llama_cpp.Llama(str(gguf), n_ctx=EXTENDED, logits_all=True, verbose=False, n_threads=2, n_batch=EXTENDED,
                          type_k=kv, type_v=kv)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32), llama_cpp.llama_model_n_ctx_train(llm.model)
    finally:
        llm.close()


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------------------------
# llama.cpp parity


@pytest.mark.parametrize("method", ["none", "linear", "yarn", "ntk", "llama3", "clex"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_matches_pizoo_f32(sharp_model, tmp_path, arch, method):
    src = sharp_model(arch, method)
    out = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    ids = eval_ids(src)
    got, n_ctx_train = llama_cpp_logits(out, ids)
    assert n_ctx_train == (EXTENDED if method != "none" else ORIGINAL)
    assert rel_diff(got, pizoo_logits(src, ids)) <= TOLERANCE["f32"]


@pytest.mark.parametrize("method", ["yarn-attn", "yarn-beta", "longrope"])
def test_llama_cpp_matches_yarn_variants_and_longrope(sharp_model, tmp_path, method):
    src = sharp_model("llama-gqa", method)
    out = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    ids = eval_ids(src)
    got, _ = llama_cpp_logits(out, ids)
    assert rel_diff(got, pizoo_logits(src, ids)) <= TOLERANCE["f32"]


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "bf16"])
@pytest.mark.parametrize("arch,method", [("llama-gqa", "llama3"), ("llama-tied", "yarn"), ("qwen2", "linear")])
def test_llama_cpp_matches_pizoo_quantised(sharp_model, tmp_path, arch, method, dtype):
    src = sharp_model(arch, method)
    out = export_gguf(src, tmp_path / "m.gguf", dtype=dtype)
    ids = eval_ids(src)
    got, _ = llama_cpp_logits(out, ids)
    assert rel_diff(got, pizoo_logits(src, ids)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("arch,method", [("llama-tied", "llama3"), ("qwen2", "yarn")])
def test_default_kv_cache_within_2e3(sharp_model, tmp_path, arch, method):
    """What users run: llama.cpp's default f16 KV cache, f32 weights."""
    src = sharp_model(arch, method)
    out = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    ids = eval_ids(src)
    got, _ = llama_cpp_logits(out, ids, kv_cache="f16")
    assert rel_diff(got, pizoo_logits(src, ids)) <= DEFAULT_KV_TOLERANCE


def test_parity_can_fail(sharp_model, tmp_path):
    """The sharp models make a dropped or wrong scaling visible far above the f32 tolerance."""
    src = sharp_model("llama-gqa", "linear")
    ids = eval_ids(src)
    model = load_model(src)
    with torch.no_grad():
        ref = model.forward_logits(torch.tensor([ids]))[0].numpy()
        for wrong in (RopeConfig(), RopeConfig().scaled("linear", 3.9, ORIGINAL)):
            model.rotary = RotaryEmbedding(wrong, model.config.head_dim)
            assert rel_diff(model.forward_logits(torch.tensor([ids]))[0].numpy(), ref) > 10 * DEFAULT_KV_TOLERANCE


def test_dynamic_refused_or_baked_at_static_length(sharp_model, tmp_path):
    src = sharp_model("llama-gqa", "dynamic")
    with pytest.raises(PizooError, match="static-length"):
        export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    ids = eval_ids(src)
    out = export_gguf(src, tmp_path / "m.gguf", dtype="f32", static_length=EVAL_TOKENS)
    got, n_ctx_train = llama_cpp_logits(out, ids)
    assert n_ctx_train == EVAL_TOKENS
    # dynamic NTK at exactly EVAL_TOKENS positions is what the static file computes
    assert rel_diff(got, pizoo_logits(src, ids)) <= TOLERANCE["f32"]


def test_static_length_only_for_dynamic(sharp_model, tmp_path):
    with pytest.raises(PizooError, match="only dynamic"):
        export_gguf(sharp_model("llama-gqa", "linear"), tmp_path / "m.gguf", static_length=128)


# --------------------------------------------------------------------------------------------
# Keys, lineage, file names


def test_gguf_keys_lineage_and_default_name(sharp_model, tmp_path):
    from gguf import GGUFReader

    src = sharp_model("llama-tied", "linear")
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    out = export_gguf(copy, dtype="q8_0")
    assert out.parent == tmp_path and out.name.endswith("-256-PI-Q8_0.gguf") and out.name.startswith("Tiny-Llama-")
    r = GGUFReader(out)
    get = lambda k: r.fields[k].contents()  # noqa: E731
    assert get("llama.context_length") == EXTENDED
    assert get("llama.rope.scaling.type") == "linear"
    assert get("llama.rope.scaling.factor") == 4.0
    assert get("llama.rope.scaling.original_context_length") == ORIGINAL
    assert get("general.finetune") == "256-pi"
    assert get("general.base_model.count") == 1
    assert get("general.base_model.0.organization") == "pizoo-tests"
    assert get("general.file_type") == 7
    assert get("tokenizer.ggml.model") == "gpt2" and get("tokenizer.ggml.pre") == "gpt-2"
    assert "tokenizer.chat_template" in r.fields
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in types  # tied head
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "Q8_0"
    with pytest.raises(PizooError, match="already exists"):
        export_gguf(copy, dtype="q8_0")


def test_llama3_and_clex_written_as_rope_freqs(sharp_model, tmp_path):
    from gguf import GGUFReader

    from pizoo.rope import frequency_factors

    for method, arch in (("llama3", "llama"), ("clex", "llama")):
        src = sharp_model("qwen2", method)
        out = export_gguf(src, tmp_path / f"{method}.gguf", dtype="f32")
        r = GGUFReader(out)
        # qwen2's llama.cpp graph has no rope_freqs input, so such a file is written as arch llama
        assert r.fields["general.architecture"].contents() == arch
        freqs = next(t for t in r.tensors if t.name == "rope_freqs.weight")
        expected = frequency_factors(open_checkpoint(src).config.rope, 16, EXTENDED).numpy()
        np.testing.assert_array_equal(np.asarray(freqs.data), expected)
        assert r.fields["llama.context_length"].contents() == EXTENDED
        # The scaling is all in rope_freqs: a rope.scaling.factor would be read as a linear factor on
        # top of it (llama.cpp's freq_scale_train, other GGUF runtimes)
        assert r.fields["llama.rope.scaling.type"].contents() == "none"
        assert "llama.rope.scaling.factor" not in r.fields


def test_yarn_attention_factor_written_as_llama_cpp_applies_it(sharp_model, tmp_path):
    from gguf import GGUFReader

    out = export_gguf(sharp_model("llama-gqa", "yarn-attn"), tmp_path / "y.gguf", dtype="f32")
    r = GGUFReader(out)
    attn = r.fields["llama.rope.scaling.attn_factor"].contents()
    # llama.cpp multiplies its own 0.1*ln(s)+1 by attn_factor: the product is the HF factor 1.3
    assert attn * (0.1 * np.log(4.0) + 1) == pytest.approx(1.3, rel=1e-6)
    default = export_gguf(sharp_model("llama-gqa", "yarn"), tmp_path / "d.gguf", dtype="f32")
    assert "llama.rope.scaling.attn_factor" not in GGUFReader(default).fields


def test_q8_0_matches_gguf_reference_quantiser():
    from gguf import GGMLQuantizationType, quants

    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    x[0, :32] = 0  # an all-zero block
    x[1, :32] = torch.arange(32) / 127 * 0.5  # halves exactly at rounding boundaries
    ours = quantize_q8_0(x).numpy()
    ref = quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(ours, ref)


# --------------------------------------------------------------------------------------------
# Tokenizers


@pytest.mark.parametrize("arch", ["llama-gqa", "llama-tied"])  # SentencePiece-style, byte-level BPE
def test_llama_cpp_tokenizes_like_hf(sharp_model, tmp_path, arch):
    from pizoo.tokenizer import load_tokenizer

    src = sharp_model(arch, "none")
    out = export_gguf(src, tmp_path / "m.gguf", dtype="f16")
    text = sample_text(12_000) + "\n  Numbers 12345 and 3.14, tabs\tand  double  spaces!  naïve café — 東京 🚀 "
    hf = load_tokenizer(src).encode(text).ids
    tail = hf[-40:]  # includes byte-fallback pieces for the SentencePiece-style vocabulary
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        decoded = llm.detokenize(tail).decode("utf-8")
    finally:
        llm.close()
    assert len(hf) > 2000
    assert ours == hf
    assert decoded.strip() == load_tokenizer(src).decode(tail, skip_special_tokens=False).strip()


def test_unknown_bpe_pre_tokenizer_refused_then_overridden(sharp_model, tmp_path):
    src = tmp_path / "odd"
    shutil.copytree(sharp_model("llama-tied", "none"), src)
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # no llama.cpp pre-tokenizer adds a prefix space
    (src / "tokenizer.json").write_text(json.dumps(spec))
    assert identify_pre(spec) is None
    with pytest.raises(PizooError, match="--pre NAME"):
        export_gguf(src, tmp_path / "m.gguf")
    with pytest.raises(PizooError, match="not a pre-tokenizer llama.cpp knows"):
        export_gguf(src, tmp_path / "m.gguf", pre="made-up")
    assert export_gguf(src, tmp_path / "m.gguf", pre="gpt-2").is_file()


# --------------------------------------------------------------------------------------------
# Import


def _config_fields(cfg: ModelConfig) -> dict:
    d = {k: v for k, v in vars(cfg).items() if k not in ("raw", "rope")}
    d["rope"] = cfg.rope.describe()
    # An import records the file it came from (source_gguf); the rest of the block round-trips.
    d["pizoo"] = {k: v for k, v in (cfg.raw.get("pizoo") or {}).items() if k != "source_gguf"} or None
    return d


@pytest.mark.parametrize("arch,method", [("llama-gqa", "llama3"), ("llama-tied", "yarn-attn"), ("qwen2", "clex"),
                                         ("qwen2", "ntk"), ("llama-gqa", "none")])
def test_import_of_export_is_bit_identical(sharp_model, tmp_path, arch, method):
    src = sharp_model(arch, method)
    gguf_file = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    back = import_gguf(gguf_file, tmp_path / "back")
    a, b = open_checkpoint(src), open_checkpoint(back)
    assert _config_fields(b.config) == _config_fields(a.config)
    assert set(a.tensors) == set(b.tensors)
    for name, t in a.iter_tensors():
        assert torch.equal(b.get_tensor(name), t), name
    text = sample_text(8_000)
    from pizoo.tokenizer import load_tokenizer

    assert load_tokenizer(back).encode(text).ids == load_tokenizer(src).encode(text).ids
    tcfg = json.loads((back / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == json.loads((src / "tokenizer_config.json").read_text())["chat_template"]


def test_import_of_bf16_and_q8_0(sharp_model, tmp_path):
    src = sharp_model("llama-gqa", "linear", torch.bfloat16)
    back = import_gguf(export_gguf(src, tmp_path / "b.gguf", dtype="bf16"), tmp_path / "b")
    for name, t in open_checkpoint(src).iter_tensors():
        assert torch.equal(open_checkpoint(back).get_tensor(name).to(torch.bfloat16), t), name
    q = import_gguf(export_gguf(src, tmp_path / "q.gguf", dtype="q8_0"), tmp_path / "q")
    ids = eval_ids(src)
    assert rel_diff(pizoo_logits(q, ids), pizoo_logits(src, ids)) <= TOLERANCE["q8_0"]


def requantize(src: Path, dst: Path, qtype_name: str) -> Path:
    """Rewrite a GGUF with its matrices in another ggml type, using only the gguf package."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    qtype = GGMLQuantizationType[qtype_name]
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        data = np.array(t.data)
        if data.ndim == 2 and t.name != "token_embd.weight":
            w.add_tensor(t.name, quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_import_of_quantised_file_is_the_model_llama_cpp_runs(sharp_model, tmp_path, qtype):
    src = sharp_model("llama-gqa", "yarn")
    quantised = requantize(export_gguf(src, tmp_path / "f32.gguf", dtype="f32"), tmp_path / "q.gguf", qtype)
    back = import_gguf(quantised, tmp_path / "hf")
    ids = eval_ids(src)
    got, _ = llama_cpp_logits(quantised, ids)
    ours = pizoo_logits(back, ids)
    # llama.cpp multiplies 4/5-bit weights with 8-bit-quantised activations; pizoo with the exact
    # dequantised weights in f32. The quantisation itself moves the logits much further from src's.
    assert rel_diff(got, ours) <= 2e-2
    assert rel_diff(ours, pizoo_logits(src, ids)) > rel_diff(got, ours)


def test_import_refuses_bad_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(PizooError, match="bad.gguf"):
        import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_overwrite_replaces_only_a_model_folder(sharp_model, tmp_path):
    gguf = export_gguf(sharp_model("llama-tied", "none"), tmp_path / "m.gguf", dtype="f32")
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    r = _cli("import", str(gguf), "--out", str(precious), "--overwrite")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "was not written by pizoo" in r.stderr, r.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
    out = import_gguf(gguf, tmp_path / "hf")
    r = _cli("import", str(gguf), "--out", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr  # a model folder is replaced


@pytest.mark.parametrize("pre,expected", [("llama-bpe", True), ("smollm", False)])
def test_import_default_add_bos_follows_llama_cpp(tmp_path, pre, expected):
    """A byte-level BPE file without tokenizer.ggml.add_bos_token: llama.cpp adds BOS for the Llama-3
    pre-tokenizers (and not for the others), so the imported tokenizer must too."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from pizoo.gguf_import import build_tokenizer

    path = tmp_path / "tok.gguf"
    w = GGUFWriter(path, "llama")
    tokens = ["<|begin_of_text|>", "a", "b", "ab"]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_key_value("tokenizer.ggml.token_type", [3, 1, 1, 1], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    w.add_array("tokenizer.ggml.merges", ["a b"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    tok, tcfg = build_tokenizer(GGUFReader(path), path)
    assert tcfg["add_bos_token"] is expected
    assert tok.encode("ab").ids == ([0, 3] if expected else [3])


def test_written_files_follow_the_umask(sharp_model, tmp_path):
    """The GGUF file and an imported folder's weights are readable by others like any file the user
    creates (mkstemp and safetensors' save_file make private 0600 files)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = export_gguf(sharp_model("llama-tied", "none"), tmp_path / "m.gguf", dtype="f32")
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        hf = import_gguf(out, tmp_path / "hf")
        assert stat.S_IMODE((hf / "model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old)


# --------------------------------------------------------------------------------------------
# CLI and inspect


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pizoo.cli", *args], capture_output=True, text=True)


def test_cli_convert_of_a_gguf_writes_to_the_current_folder_not_the_cache(sharp_model, tmp_path):
    import os

    gguf = export_gguf(sharp_model("llama-tied", "yarn"), tmp_path / "Model-F32.gguf", dtype="f32")
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    env = {**os.environ, "PIZOO_HOME": str(home)}
    for args in (("--to", "gguf", "--dtype", "f16"), ("--to", "trtllm")):
        r = subprocess.run([sys.executable, "-m", "pizoo.cli", "convert", str(gguf), *args], capture_output=True,
                           text=True, cwd=work, env=env)
        assert r.returncode == 0, r.stderr
    made = sorted(p.name for p in work.iterdir())
    # the GGUF keeps its one name (the base's public name, then context, method, type); the TensorRT-LLM
    # folder is named after the file, not the cache entry
    assert made == ["Model-F32-trtllm-float16-tp1-pp1", "Tiny-Llama-256-YARN-F16.gguf"], made
    assert [p.name for p in (home / "imports").iterdir() if not p.is_dir()] == []


def test_cli_convert_import_inspect(sharp_model, tmp_path):
    src = sharp_model("llama-gqa", "llama3")
    out = tmp_path / "m.gguf"
    r = _cli("convert", str(src), "--to", "gguf", "--dtype", "q8_0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = _cli("inspect", str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "gguf" and info["context_length"] == EXTENDED
    assert info["rope"]["type"] == "llama3" and len(info["rope"]["rope_freqs"]) == 8
    assert info["tensor_types"]["Q8_0"] > 0 and info["tokenizer"]["model"] == "llama"
    r = _cli("import", str(out), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert open_checkpoint(tmp_path / "hf").config.rope.type == "llama3"
    r = _cli("convert", str(src), "--to", "gguf", "--dtype", "q4_z", "--out", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "--dtype q4_z" in r.stderr and "Traceback" not in r.stderr
    r = _cli("import", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "missing.gguf" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------
# The streaming exporter: conversions, range checks, temporaries, signals


def test_q8_0_rounds_half_away_from_zero_like_ggml():
    """Every float32 within 64 ulps of each half-integer up to 127.5 (where a quantiser that adds 0.5
    or rounds half to even goes wrong), as block values with scale 1, against gguf's reference."""
    from gguf import GGMLQuantizationType, quants

    halves = np.arange(0, 128, dtype=np.float32) + np.float32(0.5)
    bits = halves.view(np.uint32)[:, None] + np.arange(-64, 65, dtype=np.int64)[None, :]
    vals = bits.astype(np.uint32).view(np.float32).reshape(-1)
    vals = vals[np.abs(vals) <= 127]
    vals = np.concatenate([vals, -vals, np.float32([0.0, -0.0, 1e-30, -1e-30])])
    vals = np.resize(vals, (len(vals) // 248 + 1) * 248).reshape(-1, 31)
    blocks = np.concatenate([np.full((len(vals), 1), 127, np.float32), vals], axis=1).reshape(-1, 32 * 8)
    ours = quantize_q8_0(blocks)
    assert isinstance(ours, np.ndarray)
    np.testing.assert_array_equal(ours, quants.quantize(blocks, GGMLQuantizationType.Q8_0))
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((96, 512)) * rng.choice([1e-6, 0.02, 3.0, 4e4], (96, 1))).astype(np.float32)
    x[5, 64:96] = 0.0
    x[6, 96:128] = -0.0
    np.testing.assert_array_equal(quantize_q8_0(x), quants.quantize(x, GGMLQuantizationType.Q8_0))


def test_bf16_to_f16_equals_float32_rounding_for_every_bf16():
    from pizoo.export.gguf import _F16Overflow, _bf16_to_f16, _bf16_to_f32

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    as_f32 = _bf16_to_f32(every)
    with np.errstate(over="ignore"):
        expected = as_f32.astype(np.float16)
    overflow = np.isinf(expected) & np.isfinite(as_f32)
    assert overflow.sum() == 2 * (0x7F80 - 0x4780)  # every finite bf16 from 65536 up, both signs
    ok = every[~overflow]
    np.testing.assert_array_equal(_bf16_to_f16(ok.copy()).view(np.uint16), expected[~overflow].view(np.uint16))
    with pytest.raises(_F16Overflow):
        _bf16_to_f16(every.copy())


def test_f32_to_bf16_equals_torch():
    from pizoo.export.gguf import _f32_to_bf16

    x = torch.randn(4096, generator=torch.Generator().manual_seed(3)) * 1e3
    x[:6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 3.3895314e38])
    ours = _f32_to_bf16(x.numpy().copy())
    ref = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours[3:], ref[3:])
    np.testing.assert_array_equal(ours[:2], ref[:2])
    assert np.isnan(torch.from_numpy(ours[2:3].view(np.int16)).view(torch.bfloat16).float().numpy()).all()


def test_export_does_not_import_torch(sharp_model, tmp_path):
    """Without a RoPE table to compute, the export never imports torch (~220 MiB resident)."""
    src = sharp_model("llama-gqa", "linear", torch.bfloat16)
    code = ("import sys; from pizoo.export.gguf import export_gguf; "
            f"export_gguf({str(src)!r}, {str(tmp_path / 'm.gguf')!r}, dtype='q8_0'); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_f16_export_refuses_values_beyond_float16_range(tmp_path, tokenizer_dirs, src_dtype):
    tok_dir, vocab, bos, eos = tokenizer_dirs["bpe"]
    cfg = tiny_config("llama", vocab_size=vocab, bos=bos, eos=eos)
    state = {k: v.detach().clone() for k, v in random_model(cfg).hf_state_dict().items()}
    state["model.layers.1.mlp.up_proj.weight"][3, 7] = -70000.0  # beyond float16's 65504
    src = tmp_path / "big"
    write_checkpoint(src, cfg, ((k, v.to(src_dtype)) for k, v in state.items()), copy_files_from=tok_dir)
    with pytest.raises(PizooError) as e:
        export_gguf(src, tmp_path / "m.gguf", dtype="f16")
    msg = str(e.value)
    assert "\n" not in msg and "model.layers.1.mlp.up_proj.weight" in msg and "65504" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]  # no output, no temporary left
    assert export_gguf(src, tmp_path / "q.gguf", dtype="q8_0").is_file()  # other types take such values


def test_stale_temporaries_of_the_target_are_removed(sharp_model, tmp_path):
    """A killed export leaves .NAME.XXXXXXXX.tmp: the next export of the same file removes it (a file, or
    a folder of atomic_dir's), unless a live writer holds it (flock), and leaves every other file alone."""
    import fcntl

    from pizoo.fsutil import remove_stale_temps

    stale = tmp_path / ".m.gguf.ab12cd_9.tmp"
    live = tmp_path / ".m.gguf.zz99yy00.tmp"
    others = [tmp_path / ".other.gguf.ab12cd_9.tmp", tmp_path / "m.gguf.ab12cd_9.tmp", tmp_path / ".m.gguf.x.tmp"]
    for p in (stale, live, *others):
        p.write_bytes(b"GGUF partial")
    (tmp_path / ".m.gguf.dir00000.tmp").mkdir()
    holder = open(live, "rb")
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        out = export_gguf(sharp_model("llama-tied", "none"), tmp_path / "m.gguf", dtype="f32")
        assert out.is_file() and not stale.exists() and live.exists()
        assert all(p.exists() for p in others) and not (tmp_path / ".m.gguf.dir00000.tmp").exists()
    finally:
        holder.close()
    assert remove_stale_temps(tmp_path / "m.gguf") == [live]  # its writer is gone now


def test_interrupt_inside_mkstemp_leaves_no_temporary(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM can land after mkstemp created the file and before it returned the name
    (the window test_sigterm_stops_the_export_like_ctrl_c sometimes hit): nothing may be left."""
    import tempfile

    from pizoo.fsutil import atomic_path

    real = tempfile.mkstemp

    def interrupted_mkstemp(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "mkstemp", interrupted_mkstemp)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "m.gguf"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_the_export_like_ctrl_c(tmp_path):
    """SIGTERM during `pizoo convert` exits 130 with a one-line message and leaves no temporary."""
    import os
    import signal
    import time

    from pizoo.synthetic import write_synthetic_llama

    src = write_synthetic_llama(tmp_path / "src", hidden_size=512, num_layers=2, intermediate_size=1024,
                                num_heads=8, num_kv_heads=2, vocab_size=32000, dtype=torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "pizoo.cli", "convert", str(src), "--to", "gguf", "--dtype",
                             "q8_0", "--out", str(out / "m.gguf")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not list(out.glob(".m.gguf.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert proc.poll() is None, "the export ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    assert list(out.iterdir()) == []


def test_byte_fallback_tokens_are_byte_typed_and_decode_like_hf(sharp_model, tmp_path):
    """The SentencePiece-style test tokenizer lists its <0xNN> pieces as special added tokens. llama.cpp
    must see them as BYTE (6): its detokenizer turns only those into raw bytes."""
    from gguf import GGUFReader

    from pizoo.tokenizer import load_tokenizer

    src = sharp_model("llama-gqa", "none")
    spec = json.loads((src / "tokenizer.json").read_text())
    assert any(a["content"] == "<0xE6>" and a["special"] for a in spec["added_tokens"])
    out = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    r = GGUFReader(out)
    tokens, types = r.fields["tokenizer.ggml.tokens"].contents(), r.fields["tokenizer.ggml.token_type"].contents()
    assert {types[i] for i, t in enumerate(tokens) if t.startswith("<0x") and t.endswith(">")} == {6}
    tok = load_tokenizer(src)
    text = "naïve café — 東京 🚀 ½ Ω ≈ ü"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert sum(tokens[i].startswith("<0x") for i in ids) >= 10  # the text really goes through byte pieces
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        decoded = llm.detokenize(ids).decode("utf-8")
        again = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()
    assert decoded.strip() == tok.decode(ids, skip_special_tokens=False).strip() == text
    assert again == ids
