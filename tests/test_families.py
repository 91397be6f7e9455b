"""Every registered family (pizoo.families), one parametrised test each: its tiny variant goes from
an HF folder through calibration, GGUF export and import, and TensorRT-LLM, each step checked
against its oracle.

- calibrate with every recipe: transformers loads the output and its logits equal pizoo's (fp32,
  max abs diff <= 1e-4) below the original context and at 3x it;
- GGUF (f32 weights, llama.cpp's KV cache in f32): llama.cpp's logits at the extended length equal
  pizoo's (which equal transformers', tests/test_model_parity.py) within a relative max difference
  of 2e-3, with n_ctx_train = the extended length; llama.cpp tokenizes as the HF tokenizer does;
  import(export(model)) is bit-identical at f32;
- TensorRT-LLM: the checkpoint read back by tests/test_trtllm.py's reference forward equals
  transformers (max abs diff <= 1e-4), or the family is refused in one line naming what to use;
- a RoPE method the family's llama.cpp graph cannot represent is refused, never written wrong.

The q/k weights (or q/k norms, which would undo a scaled projection) are sharpened so attention
depends on position strongly enough that a dropped scaling would fail the GGUF comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pizoo.checkpoint import open_checkpoint, write_checkpoint
from pizoo.errors import PizooError
from pizoo.export.gguf import export_gguf
from pizoo.export.trtllm import export_trtllm
from pizoo.families import FAMILIES
from pizoo.gguf_import import import_gguf
from pizoo.model import load_model
from pizoo.synthetic import random_model, sample_text, tiny_config, write_tokenizer

transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

ORIGINAL, EXTENDED = 64, 256
PARITY_TOL = 1e-4  # max abs logit difference against transformers, fp32
GGUF_TOL = 2e-3  # relative max difference llama.cpp vs pizoo, f32 weights and KV cache
SHARPEN = 12.0  # q/k projection multiplier (as tests/test_gguf.py)
SHARPEN_NORM = 3.0  # q/k norm multiplier where a norm follows the projection: attention logits x9
RECIPES = ("pi", "ntk", "dynamic-ntk", "yarn", "llama3", "clex")
FAMILY_NAMES = list(FAMILIES)


def tiny_variant(family: str) -> str:
    return next(iter(FAMILIES[family].tiny))


@pytest.fixture(scope="module")
def sharp_base(tmp_path_factory):
    """sharp_base(family) -> an unscaled tiny HF folder of the family with sharp attention."""
    root = tmp_path_factory.mktemp("family-bases")
    tok_dir = root / "tokenizer"
    vocab, bos, eos = write_tokenizer(tok_dir, "bpe")

    def make(family: str) -> Path:
        # Not named after the family: llama.cpp applies Phi-3's vocabulary rule to any GGUF whose name
        # contains "phi3", and this test vocabulary lacks Phi-3's tokens (refused, tested below).
        path = root / f"tiny-{FAMILY_NAMES.index(family)}"
        if path.exists():
            return path
        cfg = tiny_config(tiny_variant(family), vocab_size=vocab, bos=bos, eos=eos, max_position_embeddings=ORIGINAL)
        model = random_model(cfg, seed=7)
        with torch.no_grad():
            for layer in model.model.layers:
                att = layer.self_attn
                if cfg.qk_norm:  # the norm's scale x SHARPEN_NORM (a (1 + w) norm stores w)
                    for norm in (att.q_norm, att.k_norm):
                        norm.weight.copy_(SHARPEN_NORM * (norm.weight + 1) - 1 if cfg.norm_offset
                                          else SHARPEN_NORM * norm.weight)
                elif cfg.qkv_per_head:  # rows [q_h | k_h | v_h] per head
                    att.qkv_proj.weight.view(cfg.num_heads, 3, cfg.head_dim, -1)[:, :2].mul_(SHARPEN)
                elif cfg.fused_qkv:  # rows q | k | v
                    att.qkv_proj.weight[:(cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim].mul_(SHARPEN)
                else:
                    att.q_proj.weight.mul_(SHARPEN)
                    att.k_proj.weight.mul_(SHARPEN)
        write_checkpoint(path, cfg, model.hf_state_dict().items(), copy_files_from=tok_dir,
                         generation_config={"bos_token_id": bos, "eos_token_id": eos})
        return path

    return make


@pytest.fixture(scope="module")
def calibrated(sharp_base, text_file, fast_clex_recipe, tmp_path_factory):
    """calibrated(family, recipe) -> the base extended to EXTENDED tokens by one calibration step."""
    from pizoo.train import calibrate

    root = tmp_path_factory.mktemp("family-calibrated")
    clex = fast_clex_recipe
    done: dict[tuple[str, str], Path] = {}

    def make(family: str, recipe: str) -> Path:
        if (family, recipe) not in done:
            out = root / f"{family}-{recipe}"
            calibrate(str(sharp_base(family)), out, ctx=EXTENDED, recipe=str(clex) if recipe == "clex" else recipe,
                      data=[str(text_file)], steps=1, train_len=ORIGINAL, global_batch=1, micro_batch=1, lr=1e-4,
                      progress=False, log=lambda m: None)
            done[family, recipe] = out
        return done[family, recipe]

    return make


def eval_ids(folder: Path, n: int) -> list[int]:
    from pizoo.tokenizer import load_tokenizer

    ids = load_tokenizer(folder).encode(sample_text(20_000)).ids[:n]
    assert len(ids) == n
    return ids


def pizoo_logits(folder: Path, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return load_model(folder).forward_logits(torch.tensor([ids]))[0].numpy()


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_recipe_calibrates_to_what_transformers_computes(calibrated, family, recipe):
    from test_model_parity import max_diffs_vs_transformers

    config, diffs = max_diffs_vs_transformers(calibrated(family, recipe), (ORIGINAL // 2, 3 * ORIGINAL), batch=1)
    assert config.architecture == family and config.context_length == EXTENDED
    for length, diff in diffs.items():
        print(f"FIGURE {family}/{recipe} transformers@{length}: max abs diff {diff:.2e}")
        assert diff <= PARITY_TOL, f"{family}/{recipe} at {length} tokens: max abs diff {diff}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_pipeline_gguf_import_and_trtllm(calibrated, tmp_path, family):
    src = calibrated(family, "yarn")
    _check_gguf(src, tmp_path, family)
    _check_trtllm(src, tmp_path, family)
    rope_types = FAMILIES[family].trtllm_rope_types
    if rope_types is not None:  # a family whose TensorRT-LLM model takes only some methods: one it takes
        _check_trtllm(calibrated(family, "ntk" if "ntk" in rope_types else rope_types[0]), tmp_path / "t2", family)


def _check_gguf(src: Path, tmp_path: Path, family: str) -> None:
    # GGUF: llama.cpp computes what pizoo (= transformers) computes at the extended length.
    gguf_file = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    ids = eval_ids(src, 150)  # past the original 64, within the extended 256
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=EXTENDED, n_batch=EXTENDED, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache
    try:
        assert llama_cpp.llama_model_n_ctx_train(llm.model) == EXTENDED
        text = sample_text(6_000) + " naïve café 東京 12345"
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            _hf_ids(src, text), "llama.cpp tokenizes differently from the HF tokenizer"
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    want = pizoo_logits(src, ids)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"FIGURE {family}/yarn llama.cpp@{len(ids)}: relative max diff {rel:.2e}")
    assert rel <= GGUF_TOL, f"{family}: llama.cpp vs pizoo relative max diff {rel:.2e}"

    # import(export(model)) is the model, bit for bit; except a tensor llama.cpp stores with an offset
    # (Gemma's norms as 1 + w): f32(1 + w) - 1 is exact, so w comes back within one rounding of 1 + w.
    back = import_gguf(gguf_file, tmp_path / "back")
    a, b = open_checkpoint(src), open_checkpoint(back)
    assert b.config.architecture == family
    assert b.config.rope.describe() == a.config.rope.describe()
    assert set(a.tensors) == set(b.tensors)
    offsets = {t.hf: t.gguf_offset for t in a.config.tensor_table()}
    for name, t in a.iter_tensors():
        if offsets[name]:
            assert (b.get_tensor(name) - t).abs().max() <= 2.0 ** -24 * (1 + t.abs().max()), name
        else:
            assert torch.equal(b.get_tensor(name), t), name
    assert b.config.to_hf_dict() == {**a.config.to_hf_dict(), "pizoo": b.config.raw["pizoo"]}


def _check_trtllm(src: Path, tmp_path: Path, family: str) -> None:
    # TensorRT-LLM, or a one-line refusal naming what to use (the family, or this RoPE method for it).
    fam = FAMILIES[family]
    rope_type = open_checkpoint(src).config.rope.type
    if fam.trtllm_arch is None or (fam.trtllm_rope_types is not None and rope_type not in fam.trtllm_rope_types):
        with pytest.raises(PizooError) as e:
            export_trtllm(src, tmp_path / "trt", dtype="float32", tp=2)
        assert "\n" not in str(e.value) and ("--to gguf" in str(e.value) or "--formats hf" in str(e.value))
        assert not (tmp_path / "trt").exists()
    else:
        from test_trtllm import hf_logits, reference_logits

        ckpt = export_trtllm(src, tmp_path / "trt", dtype="float32", tp=2)
        assert json.loads((ckpt / "config.json").read_text())["architecture"] == fam.trtllm_arch
        x = torch.tensor(eval_ids(src, 100))
        diff = (reference_logits(ckpt, x) - hf_logits(src, x)).abs().max().item()
        print(f"FIGURE {family} trtllm: max abs diff {diff:.2e}")
        assert diff <= PARITY_TOL, f"{family}: TensorRT-LLM reference vs transformers max abs diff {diff}"


def _hf_ids(folder: Path, text: str) -> list[int]:
    from pizoo.tokenizer import load_tokenizer

    return load_tokenizer(folder).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("family", [f for f, fam in FAMILIES.items()
                                    if not fam.gguf.rope_freqs and not fam.gguf.rope_factor_pair
                                    and fam.gguf_fallback is None])
@pytest.mark.parametrize("recipe", ["llama3", "clex"])
def test_per_frequency_methods_refused_where_the_graph_has_no_rope_freqs(calibrated, tmp_path, family, recipe):
    src = calibrated(family, recipe)
    with pytest.raises(PizooError) as e:
        export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    msg = str(e.value)
    assert "\n" not in msg and "rope_freqs" in msg and "linear, ntk or yarn" in msg
    assert not list(tmp_path.iterdir())


def test_a_known_family_with_an_unmodelled_feature_is_refused(tmp_path):
    from pizoo.config import ModelConfig

    d = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128}
    with pytest.raises(PizooError, match="qwen3_moe.*mixture-of-experts"):
        ModelConfig.from_hf_dict(d, "config.json")


def test_no_family_name_is_compared_outside_the_registry():
    import re

    root = Path(__file__).resolve().parents[1] / "pizoo"
    names = "|".join(FAMILIES)
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    hits = [f"{p.relative_to(root)}:{i}: {line.strip()}"
            for p in root.rglob("*.py") if "families" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


LENIENT_RECIPE = """\
name = "pi-lenient"
method = "pi"
description = "Position Interpolation with a gate a random tiny model passes (tests only)."
citation = "Chen, Wong, Chen, Tian. arXiv:2306.15595 (2023)"

[train]
steps = 1
global_batch = 1
lr = 1e-4

[gate]
max_ppl_ratio_target = 100.0
max_ppl_ratio_original = 100.0
min_passkey_accuracy = 0.0
"""


@pytest.mark.parametrize("family", [f for f, fam in FAMILIES.items() if fam.trtllm_arch is None or (
    fam.trtllm_rope_types is not None and "linear" not in fam.trtllm_rope_types)])
def test_extend_writes_the_formats_the_family_has_and_refuses_one_asked_for_that_it_lacks(
        sharp_base, tmp_path, monkeypatch, family):
    """By default extend writes every format the family (with PI's scaling) can be written as and runs
    to the end; a format asked for that it lacks is refused in one line before anything is written."""
    from pizoo.pipeline import ExtendOptions, extend

    monkeypatch.setenv("PIZOO_HOME", str(tmp_path / "home"))
    recipe = tmp_path / "pi-lenient.toml"
    recipe.write_text(LENIENT_RECIPE)
    out = tmp_path / "out"
    opts = dict(model=str(sharp_base(family)), ctx=EXTENDED, out=out, recipe=str(recipe), train_len=ORIGINAL,
                eval="quick", eval_ctx=[EXTENDED], progress=False)
    with pytest.raises(PizooError) as e:
        extend(ExtendOptions(**opts, formats=("hf", "gguf", "trtllm")), say=lambda m: None)
    msg = str(e.value)  # the family has no TensorRT-LLM form, or none for PI's scaling
    assert "\n" not in msg and (msg.startswith("--formats trtllm: ") or " with --formats trtllm: " in msg)
    assert not out.exists()

    summary = extend(ExtendOptions(**opts), say=lambda m: None)
    assert not (out / "trtllm").exists()
    [gguf_file] = (out / "gguf").glob("*.gguf")
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=EXTENDED, verbose=False)
    try:
        assert llama_cpp.llama_model_n_ctx_train(llm.model) == EXTENDED
    finally:
        llm.close()
    assert load_model(out / "hf").config.architecture == family
    assert summary["stages_run"] == ["resolve", "calibrate", "evaluate", "convert-gguf", "register"]


# --------------------------------------------------------------------------------------------
# LongRoPE's factor pair (llama.cpp's phi3 graph)

PAIR_FAMILIES = [f for f, fam in FAMILIES.items() if fam.gguf.rope_factor_pair]


def _llama_cpp_scores(gguf_file: Path, ids: list[int], n_ctx: int) -> tuple[np.ndarray, int]:
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32), llm.n_ctx()
    finally:
        llm.close()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("recipe", ["pi", "dynamic-ntk", "clex"])
@pytest.mark.parametrize("family", PAIR_FAMILIES)
def test_every_recipe_goes_out_as_the_factor_pair_llama_cpp_computes(calibrated, tmp_path, family, recipe):
    src = calibrated(family, recipe)
    gguf_file = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    from gguf import GGUFReader

    names = {t.name for t in GGUFReader(gguf_file).tensors}
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= names and "rope_freqs.weight" not in names
    ids = eval_ids(src, 150)
    got, _ = _llama_cpp_scores(gguf_file, ids, EXTENDED)
    rel = _rel(got, pizoo_logits(src, ids))
    print(f"FIGURE {family}/{recipe} llama.cpp@{len(ids)}: relative max diff {rel:.2e}")
    assert rel <= GGUF_TOL, f"{family}/{recipe}: llama.cpp vs pizoo relative max diff {rel:.2e}"


@pytest.mark.parametrize("family", PAIR_FAMILIES)
def test_llama_cpp_switches_factor_sets_at_the_original_context_and_imports_without_pizoo_keys(
        sharp_base, tmp_path, family):
    """Distinct short and long factors, an original context of 256 (llama.cpp pads its context to 256,
    so the switch is only observable there): llama.cpp with n_ctx = 256 computes what HF computes on
    a sequence within the original context (short factors), with n_ctx = 1024 what it computes past it
    (long). A file without pizoo's keys (what llama.cpp's own converter writes) imports to that model."""
    from pizoo.config import RopeConfig
    from pizoo.synthetic import random_model

    orig, ext, half = 256, 1024, 6  # rotary dim 12 -> 6 factors
    gen = torch.Generator().manual_seed(3)
    short = (1.0 + 0.5 * torch.rand(half, generator=gen)).tolist()
    long = (1.0 + 6.0 * torch.linspace(0, 1, half) ** 2).tolist()
    rope = RopeConfig(type="longrope", theta=10000.0, factor=ext / orig, original_context=orig,
                      short_factor=short, long_factor=long)
    base = open_checkpoint(sharp_base(family)).config
    cfg = tiny_config(tiny_variant(family), vocab_size=base.vocab_size, bos=base.bos_token_id,
                      eos=base.eos_token_id, max_position_embeddings=ext, rope=rope)
    model = random_model(cfg, seed=5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[:(cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim].mul_(SHARPEN)
    src = tmp_path / "longrope"
    write_checkpoint(src, cfg, model.hf_state_dict().items(), copy_files_from=sharp_base(family))
    gguf_file = export_gguf(src, tmp_path / "m.gguf", dtype="f32")

    ids = eval_ids(src, 400)
    within, n_ctx = _llama_cpp_scores(gguf_file, ids[:200], orig)
    assert n_ctx == orig
    past, _ = _llama_cpp_scores(gguf_file, ids, ext)
    want_within, want_past = pizoo_logits(src, ids[:200]), pizoo_logits(src, ids)
    # the check can fail: the two factor sets give different logits over the same 200 tokens
    assert _rel(want_within, pizoo_logits(src, ids)[:200]) > 0.05
    for label, got, want in (("short", within, want_within), ("long", past, want_past)):
        rel = _rel(got, want)
        print(f"FIGURE {family} longrope {label} factors llama.cpp: relative max diff {rel:.2e}")
        assert rel <= GGUF_TOL, f"{family} {label} factors: llama.cpp vs pizoo relative max diff {rel:.2e}"

    foreign = _without_pizoo_keys(gguf_file, tmp_path / "foreign.gguf")
    back = import_gguf(foreign, tmp_path / "back")
    got_rope = open_checkpoint(back).config.rope
    assert got_rope.type == "longrope" and got_rope.original_context == orig
    diff = float(np.abs(pizoo_logits(back, ids) - want_past).max())
    print(f"FIGURE {family} import without pizoo keys: max abs diff {diff:.2e}")
    assert diff <= PARITY_TOL


def _without_pizoo_keys(src: Path, dst: Path) -> Path:
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith(("GGUF.", "pizoo.")) or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_a_name_llama_cpp_reads_as_phi3_without_its_tokens_is_refused(sharp_base, tmp_path):
    from pizoo.export.gguf import refuse_unloadable_name

    with pytest.raises(PizooError) as e:
        refuse_unloadable_name("Phi-3-mini 3.8B 16k-pi", ["<|endoftext|>", "a"], "m/config.json")
    assert "\n" not in str(e.value) and "'</s>'" in str(e.value) and "rename" in str(e.value)
    refuse_unloadable_name("Phi-3-mini 3.8B 16k-pi", ["</s>", "<unk>", "<s>", "<|endoftext|>"], "m/config.json")
    refuse_unloadable_name("SmolLM2 135M", ["a"], "m/config.json")
    import shutil

    named = shutil.copytree(sharp_base(PAIR_FAMILIES[0]), tmp_path / "phi3-tiny")
    with pytest.raises(PizooError, match="phi3"):
        export_gguf(named, tmp_path / "m.gguf", dtype="f32")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("family", PAIR_FAMILIES)
def test_tied_embeddings_run_in_llama_cpp(tmp_path, family):
    """Phi-4-mini ties its output head to the embeddings: llama.cpp's graph reuses token_embd."""
    from pizoo.synthetic import write_tiny_model

    src = write_tiny_model(tmp_path / "tiny-tied", tiny_variant(family), tie_word_embeddings=True)
    gguf_file = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    ids = eval_ids(src, 60)
    got, _ = _llama_cpp_scores(gguf_file, ids, 256)
    rel = _rel(got, pizoo_logits(src, ids))
    print(f"FIGURE {family} tied llama.cpp: relative max diff {rel:.2e}")
    assert rel <= GGUF_TOL
