"""What GPT-NeoX brings beyond the registry's parametrised test (tests/test_families.py): checkpoints
that transformers itself writes (both residual forms, the v5 and the v4 key names) load and compute
as transformers does; a GGUF without pizoo's keys (what llama.cpp's converter writes) imports; the
variants pizoo does not model are refused in one line; the known bases plan without a download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pizoo.config import ModelConfig
from pizoo.errors import PizooError
from pizoo.model import load_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference, fp32


def _transformers_neox(path: Path, parallel: bool, legacy_keys: bool) -> Path:
    """A tiny random GPTNeoXForCausalLM saved by transformers; `legacy_keys` rewrites its config in
    transformers v4's names (rotary_pct, rotary_emb_base, no rope_parameters)."""
    cfg = transformers.GPTNeoXConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=128,
                                     use_parallel_residual=parallel,
                                     rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                                      "partial_rotary_factor": 0.5})
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and biases, so a swapped or dropped one shows
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    if legacy_keys:
        d = json.loads((path / "config.json").read_text())
        params = d.pop("rope_parameters")
        d.update(rotary_pct=params["partial_rotary_factor"], rotary_emb_base=params["rope_theta"])
        (path / "config.json").write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("parallel,legacy_keys", [(True, False), (False, False), (True, True)])
def test_a_checkpoint_transformers_wrote_computes_what_transformers_computes(tmp_path, parallel, legacy_keys):
    folder = _transformers_neox(tmp_path / "neox", parallel, legacy_keys)
    cfg = load_model(folder).config
    assert (cfg.parallel_residual, cfg.rotary_dim, cfg.rope.theta) == (parallel, 8, 5000.0)
    ids = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_model(folder).forward_logits(ids)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"FIGURE gpt_neox parallel={parallel} legacy={legacy_keys}: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_names_map_both_ways_for_every_tensor():
    from pizoo.families import FAMILIES
    from pizoo.synthetic import random_model, tiny_config

    cfg = tiny_config("gpt_neox")
    fam = FAMILIES["gpt_neox"]
    model_names = set(random_model(cfg).hf_state_dict())
    assert model_names == {t.hf for t in cfg.tensor_table()}  # the checkpoint's names, every one
    for name in model_names:
        assert fam.hf_name(fam.model_name(name)) == name and fam.model_name(name) != name


def test_a_gguf_without_pizoo_keys_imports_to_the_same_model(tmp_path, monkeypatch):
    """What llama.cpp's converter writes: no pizoo.* keys; rows of attn_qkv as Q|K|V blocks, regrouped
    while streaming (chunks of 16 rows here, so a chunk holds parts of several heads' blocks)."""
    from gguf import GGUFReader
    from test_families import _without_pizoo_keys

    import pizoo.export.gguf as gguf_export
    from pizoo.export.gguf import export_gguf
    from pizoo.families import qkv_blocks
    from pizoo.gguf_import import import_gguf
    from pizoo.synthetic import write_tiny_model

    src = write_tiny_model(tmp_path / "src", "gpt_neox", max_position_embeddings=128)
    monkeypatch.setattr(gguf_export, "CHUNK_ELEMENTS", 16 * 64)  # 16 rows of the 64-wide qkv weight
    gguf_file = export_gguf(src, tmp_path / "m.gguf", dtype="f32")
    monkeypatch.undo()
    qkv = {t.name: np.array(t.data) for t in GGUFReader(gguf_file).tensors if t.name.startswith("blk.0.attn_qkv")}
    ckpt = load_model(src)
    assert np.array_equal(qkv["blk.0.attn_qkv.weight"],
                          qkv_blocks(ckpt.model.layers[0].self_attn.qkv_proj.weight.detach().numpy(), 4))
    assert np.array_equal(qkv["blk.0.attn_qkv.bias"],
                          qkv_blocks(ckpt.model.layers[0].self_attn.qkv_proj.bias.detach().numpy(), 4))
    back = import_gguf(_without_pizoo_keys(gguf_file, tmp_path / "foreign.gguf"), tmp_path / "back")
    ids = torch.randint(0, 300, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (load_model(back).forward_logits(ids) - load_model(src).forward_logits(ids)).abs().max().item()
    assert diff == 0.0


@pytest.mark.parametrize("change,needle", [({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
                                           ({"num_key_value_heads": 2}, "num_key_value_heads"),
                                           ({"tie_word_embeddings": True}, "tie_word_embeddings")])
def test_unmodelled_variants_are_refused_in_one_line(tmp_path, change, needle):
    d = json.loads((_transformers_neox(tmp_path / "neox", True, False) / "config.json").read_text())
    with pytest.raises(PizooError) as e:
        ModelConfig.from_hf_dict({**d, **change}, "neox/config.json")
    assert "\n" not in str(e.value) and needle in str(e.value) and str(e.value).startswith("neox/config.json: ")


def test_lora_is_refused_in_one_line(tmp_path):
    from pizoo.lora import for_run, lora_settings
    from pizoo.recipes import load_recipe
    from pizoo.synthetic import tiny_config

    with pytest.raises(PizooError) as e:
        for_run(lora_settings(8), load_recipe("pi"), tiny_config("gpt_neox"))
    assert "\n" not in str(e.value) and e.value.args[0].startswith("--lora: ")


@pytest.mark.parametrize("alias,params", [("pythia-160m", 162e6), ("pythia-1.4b", 1.41e9), ("gpt-neox-20b", 20.6e9)])
def test_known_bases_plan_without_a_download(alias, params):
    from pizoo.plan import planning_config

    cfg, _ = planning_config(alias)
    assert cfg.architecture == "gpt_neox" and cfg.rope_dim == cfg.head_dim // 4 and cfg.parallel_residual
    assert abs(cfg.num_params() / params - 1) < 0.02, cfg.num_params()
    hf = transformers.AutoConfig.for_model(**cfg.to_hf_dict())  # transformers reads what pizoo writes
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25 and hf.use_parallel_residual
    assert np.isclose(hf.layer_norm_eps, 1e-5)


def test_tensorrt_llm_refuses_what_its_gpt_neox_does_not_build(tmp_path):
    from pizoo.export.trtllm import export_trtllm

    folder = _transformers_neox(tmp_path / "neox", parallel=False, legacy_keys=False)
    with pytest.raises(PizooError) as e:
        export_trtllm(folder, tmp_path / "trt", dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and "parallel residual" in msg and "--to gguf" in msg
    assert not (tmp_path / "trt").exists()
