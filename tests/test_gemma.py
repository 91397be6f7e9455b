"""What Gemma brings beyond the registry's parametrised test (tests/test_families.py): RoPE scaling
that reaches Gemma 3's global layers only, in pizoo, transformers and llama.cpp; blocked attention
(sliding window, soft-capping, a KV cache) equal to the dense masked reference; the multimodal
checkpoint refused; the known bases planned without a download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pizoo.checkpoint import write_checkpoint
from pizoo.config import ModelConfig, RopeConfig
from pizoo.errors import PizooError
from pizoo.model import KVCache, attend, load_model
from pizoo.synthetic import random_model, tiny_config, write_tokenizer

transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

ORIGINAL, EXTENDED, LENGTH = 64, 256, 200
TOL = 1e-4  # max abs logit difference, fp32
GGUF_TOL = 2e-3  # relative, llama.cpp f32 weights and KV cache


def _gemma3_pair(root: Path, silence: str) -> tuple[Path, Path]:
    """The same tiny Gemma 3 weights unscaled and PI-scaled x4, with the `silence` layer kind
    (local or global) made the identity (zero attention output and MLP output)."""
    vocab, bos, eos = write_tokenizer(root / "tok", "bpe")
    out = []
    for rope in (RopeConfig(theta=10000.0),
                 RopeConfig(type="linear", theta=10000.0, factor=EXTENDED / ORIGINAL, original_context=ORIGINAL)):
        cfg = tiny_config("gemma3", vocab_size=vocab, bos=bos, eos=eos, max_position_embeddings=EXTENDED, rope=rope)
        model = random_model(cfg, seed=11)
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                layer.self_attn.q_norm.weight.copy_(3 * (layer.self_attn.q_norm.weight + 1) - 1)  # sharp attention
                layer.self_attn.k_norm.weight.copy_(3 * (layer.self_attn.k_norm.weight + 1) - 1)
                local = cfg.layer_window(i) is not None
                if local == (silence == "local"):
                    layer.self_attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
        if rope.is_scaled:
            cfg.raw["pizoo"] = {"rope_method": "pi", "target_context": EXTENDED}
        path = root / f"{silence}-{rope.type}"
        write_checkpoint(path, cfg, model.hf_state_dict().items(), copy_files_from=root / "tok")
        out.append(path)
    return out[0], out[1]


def _three_runtimes(folder: Path, ids: list[int], tmp: Path) -> dict[str, np.ndarray]:
    from pizoo.export.gguf import export_gguf

    with torch.no_grad():
        ours = load_model(folder).forward_logits(torch.tensor([ids]))[0].numpy()
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    gguf_file = export_gguf(folder, tmp / f"{folder.name}.gguf", dtype="f32")
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=EXTENDED, n_batch=EXTENDED, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        cpp = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    return {"pizoo": ours, "transformers": theirs, "llama.cpp": cpp}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("silence", ["global", "local"])
def test_gemma3_scaling_reaches_the_global_layers_only(tmp_path, silence):
    """With only local layers active, scaling x4 changes nothing, in every runtime; with only the
    global layer active, it changes the logits (so the first check can fail)."""
    unscaled, scaled = _gemma3_pair(tmp_path, silence)
    ids = [int(x) for x in torch.randint(3, 500, (LENGTH,), generator=torch.Generator().manual_seed(2))]
    before, after = _three_runtimes(unscaled, ids, tmp_path), _three_runtimes(scaled, ids, tmp_path)
    for runtime in before:
        tol = GGUF_TOL if runtime == "llama.cpp" else TOL
        for label, got in (("unscaled", before), ("scaled", after)):
            rel = _rel(got[runtime], got["pizoo"])
            assert rel <= tol, f"{runtime} vs pizoo, {label}: relative max diff {rel:.2e}"
        change = _rel(after[runtime], before[runtime])
        print(f"FIGURE gemma3 {silence} layers silenced, {runtime}: scaling changes logits by {change:.2e} (relative)")
        if silence == "global":  # only local layers left: scaling must not reach them
            assert change <= tol, f"{runtime}: scaling changed a model of local layers only ({change:.2e})"
        else:
            assert change > 0.05, f"{runtime}: scaling did not reach the global layer ({change:.2e})"


# --------------------------------------------------------------------------------------------
# Blocked attention against the dense masked reference


def _reference(q, k, v, past, scale, window, cap):
    T, S = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    i, j = torch.arange(past, past + T)[:, None], torch.arange(S)[None, :]
    visible = (j <= i) & ((j > i - window) if window else True)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v


@pytest.mark.parametrize("window,cap,past", [(48, None, 0), (48, 50.0, 0), (None, 20.0, 0), (48, 20.0, 100),
                                             (None, None, 100), (300, None, 0)])
def test_blocked_attention_equals_the_dense_masked_reference(window, cap, past):
    gen = torch.Generator().manual_seed(0)
    T = 230
    q = torch.randn(1, 4, T, 16, generator=gen) * 3
    k, v = torch.randn(1, 2, past + T, 16, generator=gen) * 3, torch.randn(1, 2, past + T, 16, generator=gen)
    got = attend(q, k, v, past=past, scale=0.2, window=window, cap=cap, block=64)
    diff = (got - _reference(q, k, v, past, 0.2, window, cap)).abs().max().item()
    assert diff <= 1e-5, diff


def test_generation_with_a_cache_equals_the_full_forward_for_gemma2(tmp_path):
    """Soft-capping and the window hold token by token: cached decoding gives the full forward's logits."""
    cfg = tiny_config("gemma2", max_position_embeddings=EXTENDED, sliding_window=16)
    model = random_model(cfg, seed=3)
    ids = torch.randint(0, 500, (1, 60), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model.forward_logits(ids)[0]
        cache = KVCache(64)
        steps = [model.logits(model(ids[:, :40], cache=cache))[0]]
        for t in range(40, 60):
            steps.append(model.logits(model(ids[:, t:t + 1], cache=cache))[0])
    diff = (torch.cat(steps) - full).abs().max().item()
    assert diff <= 1e-5, diff


# --------------------------------------------------------------------------------------------
# Bad input and known bases


def test_the_multimodal_checkpoint_is_refused_in_one_line():
    d = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
         "text_config": {"hidden_size": 2560}, "vision_config": {}}
    with pytest.raises(PizooError) as e:
        ModelConfig.from_hf_dict(d, "gemma-3-4b/config.json")
    msg = str(e.value)
    assert "\n" not in msg and "vision tower" in msg and "gemma3_text" in msg


def test_scaled_local_layers_and_bidirectional_attention_are_refused():
    cfg = tiny_config("gemma3")
    d = cfg.to_hf_dict()
    d["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(PizooError, match="local layers keep unscaled RoPE"):
        ModelConfig.from_hf_dict(d)
    with pytest.raises(PizooError, match="use_bidirectional_attention"):
        ModelConfig.from_hf_dict({**cfg.to_hf_dict(), "use_bidirectional_attention": True})


@pytest.mark.parametrize("alias", ["gemma-2-2b", "gemma-2-9b", "gemma-3-270m", "gemma-3-1b"])
def test_known_gemma_bases_plan_without_a_download(alias):
    from pizoo.plan import planning_config

    cfg, _ = planning_config(alias)
    assert cfg.family.model_type in ("gemma2", "gemma3_text") and cfg.norm_offset and cfg.embedding_scale
    assert 0 < len(cfg.sliding_window_layers) < cfg.num_layers  # local and global layers both
    # transformers builds the same network from the config pizoo writes for it (no weights)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    assert hf_cfg.layer_types == ["sliding_attention" if cfg.layer_window(i) else "full_attention"
                                  for i in range(cfg.num_layers)]
    assert hf_cfg.query_pre_attn_scalar == cfg.query_pre_attn_scalar


def test_a_k_quant_gemma_gguf_imports_to_what_llama_cpp_computes(tmp_path):
    """A Q4_K_M file (llama.cpp's own mix: Q4_K, Q6_K and more) of a Gemma 3 whose rows fit K-quant
    blocks (256) imports (dequantised) to a model whose logits are llama.cpp's on that file."""
    from gguf import GGUFReader

    from pizoo.export.gguf import export_gguf
    from pizoo.export.quantize import quantize_gguf
    from pizoo.gguf_import import import_gguf

    vocab, bos, eos = write_tokenizer(tmp_path / "tok", "bpe")
    cfg = tiny_config("gemma3", vocab_size=vocab, bos=bos, eos=eos, hidden_size=256, intermediate_size=512,
                      head_dim=64, query_pre_attn_scalar=64.0, max_position_embeddings=EXTENDED)
    write_checkpoint(tmp_path / "hf", cfg, random_model(cfg, seed=5).hf_state_dict().items(),
                     copy_files_from=tmp_path / "tok")
    f16 = export_gguf(tmp_path / "hf", tmp_path / "m-f16.gguf", dtype="f16")
    q = quantize_gguf(f16, tmp_path / "m-q4_k_m.gguf", "q4_k_m").path
    kinds = {t.tensor_type.name for t in GGUFReader(q).tensors if len(t.shape) == 2}
    assert {"Q4_K", "Q6_K"} <= kinds, kinds
    back = import_gguf(q, tmp_path / "back")
    ids = [int(x) for x in torch.randint(3, vocab, (120,), generator=torch.Generator().manual_seed(6))]
    with torch.no_grad():
        ours = load_model(back).forward_logits(torch.tensor([ids]))[0].numpy()
    llm = llama_cpp.Llama(str(q), n_ctx=EXTENDED, n_batch=EXTENDED, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)
    try:
        llm.eval(ids)
        cpp = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    rel = _rel(cpp, ours)
    print(f"FIGURE gemma3 Q4_K_M import vs llama.cpp on the same file: relative max diff {rel:.2e}")
    # llama.cpp multiplies K-quant blocks against activations it quantises to Q8_K; pizoo multiplies
    # the exactly dequantised weights in float32: the gap is that activation rounding.
    assert rel <= 3e-2


def test_the_plan_counts_local_layers_and_soft_capped_scores():
    """A local layer attends to its window (FLOPs); a soft-capped global layer keeps its [T, T] scores
    for backward while a plain one (flash) keeps none; Gemma 3 1B at 32k: 22 local layers, 4 global."""
    from pizoo.plan import attended_keys, kept_scores_per_head, planning_config

    g3, _ = planning_config("gemma-3-1b")
    T = 32768
    assert attended_keys(g3, T) == 22 * 512 + 4 * T
    assert kept_scores_per_head(g3, 5, T) == 0 and kept_scores_per_head(g3, 0, T) == T * (512 + 512)
    g2, _ = planning_config("gemma-2-2b")
    assert kept_scores_per_head(g2, 1, T) == T * T  # global, capped: eager scores
    assert kept_scores_per_head(g2, 0, T) == T * (4096 + 512)  # local, capped: its window and a block
