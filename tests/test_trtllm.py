"""TensorRT-LLM checkpoint export (`pizoo convert --to trtllm`).

The oracle is transformers' logits on the source folder. The checkpoint is read back by a reference
forward written here from TensorRT-LLM's definitions alone (plain torch, float64; nothing from
pizoo.rope or pizoo.model): per-rank fused qkv split into q/k/v, row-parallel outputs summed over
ranks, MLP = proj(silu(fc(x)) * gate(x)), RoPE rebuilt from rotary_base and rotary_scaling as
TensorRT-LLM computes it, pipeline stages run in order, lm_head shards concatenated.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pizoo.checkpoint import read_safetensors_header
from pizoo.cli import app
from pizoo.config import RopeConfig
from pizoo.export.trtllm import export_trtllm, trtllm_build_command, trtllm_card_section

TOL = 1e-4  # max |logit difference| against transformers, float32 export
SEQ = 40  # longer than the original context 16 of the scaled models, shorter than their 64
BASE = RopeConfig(theta=10000.0)

# name -> write_tiny_model arguments
MODELS = {
    "llama": dict(variant="llama"),
    "llama-bias": dict(variant="llama", attention_bias=True),
    "gqa-tied-linear": dict(variant="llama-gqa-tied", rope=BASE.scaled("linear", 4, 16)),
    "gqa-tied-yarn": dict(variant="llama-gqa-tied", rope=BASE.scaled("yarn", 4, 16)),
    "llama-yarn-attn": dict(variant="llama", rope=BASE.scaled("yarn", 4, 16, attention_factor=1.3, beta_fast=16.0)),
    "qwen2-llama3": dict(variant="qwen2", rope=BASE.scaled("llama3", 4, 16)),
    "llama-bias-ntk": dict(variant="llama", attention_bias=True, rope=BASE.scaled("ntk", 4, 16)),
    "mistral-dynamic": dict(variant="mistral", rope=BASE.scaled("dynamic", 4, 16)),
}


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    def get(name: str, **extra) -> Path:
        kwargs = dict(MODELS.get(name, {}), **extra)
        return tiny_model_factory(f"trtllm-{name}", max_position_embeddings=64, **kwargs)

    return get


# ------------------------------------------------------------------------------------------------
# Reference forward, from TensorRT-LLM's definitions


def _mscale(scale: float, m: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def reference_rope(config: dict, seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin multiplier as TensorRT-LLM builds them (RopeEmbeddingUtils
    and the attention kernel's dynamic base update)."""
    d, base = config["head_size"], float(config["rotary_base"])
    sc = config["rotary_scaling"] or {}
    kind = sc.get("type", "none")
    s = float(sc.get("factor", 1.0))
    exponent = torch.arange(0, d, 2, dtype=torch.float64) / d
    if kind == "dynamic":
        limit = config["max_position_embeddings"]
        if seq_len > limit:
            base = base * ((s * seq_len / limit) - (s - 1)) ** (d / (d - 2))
        return base ** -exponent, 1.0
    inv = base ** -exponent
    if kind == "none":
        return inv, 1.0
    if kind == "linear":
        return inv / s, 1.0
    if kind == "llama3":
        L, lo, hi = sc["original_max_position_embeddings"], sc["low_freq_factor"], sc["high_freq_factor"]
        out = []
        for f in inv.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < L / hi:
                out.append(f)
            elif wavelen > L / lo:
                out.append(f / s)
            else:
                smooth = (L / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * f / s + smooth * f)
        return torch.tensor(out, dtype=torch.float64), 1.0
    if kind == "yarn":
        L = sc["original_max_position_embeddings"]

        def corr(rot: float) -> float:
            return d * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(sc["beta_fast"])), 0)
        high = min(math.ceil(corr(sc["beta_slow"])), d - 1)
        if low == high:
            high += 0.001
        keep = 1 - torch.clamp((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low), 0, 1)
        inv = inv / s * (1 - keep) + inv * keep
        return inv, _mscale(s, sc["mscale"]) / _mscale(s, sc["mscale_all_dim"])
    raise AssertionError(f"rotary scaling type {kind!r} is not one the reference implements")


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2  # rope_gpt_neox: pairs (i, i + d/2)
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def load_ranks(ckpt: Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    config = json.loads((ckpt / "config.json").read_text())
    world = config["mapping"]["world_size"]
    assert sorted(p.name for p in ckpt.glob("rank*.safetensors")) == sorted(f"rank{r}.safetensors" for r in range(world))
    return config, [{k: v.double() for k, v in load_file(ckpt / f"rank{r}.safetensors").items()} for r in range(world)]


def reference_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    config, ranks = load_ranks(ckpt)
    if config["architecture"] == "GPTNeoXForCausalLM":
        return neox_reference_logits(config, ranks, ids)
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    hd, eps, V = config["head_size"], config["norm_epsilon"], config["vocab_size"]
    nh_local = config["num_attention_heads"] // tp

    def rank(tp_rank: int, stage: int) -> dict[str, torch.Tensor]:
        return ranks[stage * tp + tp_rank]

    embeds = [rank(r, 0)["transformer.vocab_embedding.weight"] for r in range(tp)]
    assert all(torch.equal(e, embeds[0]) for e in embeds), "use_parallel_embedding=false: every tp rank holds it all"
    x = embeds[0][ids]
    T = ids.shape[0]
    inv, mult = reference_rope(config, T)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat((angles.cos(), angles.cos()), -1) * mult
    sin = torch.cat((angles.sin(), angles.sin()), -1) * mult
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for stage in range(pp):
        names = rank(0, stage).keys()
        assert ("transformer.vocab_embedding.weight" in names) == (stage == 0)
        assert ("lm_head.weight" in names) == ("transformer.ln_f.weight" in names) == (stage == pp - 1)
        n_local = len({n.split(".")[2] for n in names if n.startswith("transformer.layers.")})
        assert n_local == config["num_hidden_layers"] // pp
        for layer in range(n_local):  # layer numbers restart at 0 on every stage
            pre = f"transformer.layers.{layer}."
            h = _rms(x, rank(0, stage)[pre + "input_layernorm.weight"], eps)
            attn = torch.zeros_like(x)
            for r in range(tp):
                w = rank(r, stage)
                qkv = h @ w[pre + "attention.qkv.weight"].T
                if pre + "attention.qkv.bias" in w:
                    qkv = qkv + w[pre + "attention.qkv.bias"]
                kv_local = (qkv.shape[-1] - nh_local * hd) // (2 * hd)
                assert kv_local == -(-config["num_key_value_heads"] // tp)  # ceil(n_kv / tp) heads per rank
                q, k, v = qkv.split([nh_local * hd, kv_local * hd, kv_local * hd], dim=-1)
                q = _rotate(q.view(T, nh_local, hd).transpose(0, 1), cos, sin)
                k = _rotate(k.view(T, kv_local, hd).transpose(0, 1), cos, sin)
                v = v.view(T, kv_local, hd).transpose(0, 1)
                group = nh_local // kv_local
                k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
                probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + causal, dim=-1)
                out = (probs @ v).transpose(0, 1).reshape(T, nh_local * hd)
                attn = attn + out @ w[pre + "attention.dense.weight"].T
            if pre + "attention.dense.bias" in rank(0, stage):
                attn = attn + rank(0, stage)[pre + "attention.dense.bias"]
            x = x + attn
            h = _rms(x, rank(0, stage)[pre + "post_layernorm.weight"], eps)
            mlp = torch.zeros_like(x)
            for r in range(tp):
                w = rank(r, stage)
                fc, gate = h @ w[pre + "mlp.fc.weight"].T, h @ w[pre + "mlp.gate.weight"].T
                mlp = mlp + (torch.nn.functional.silu(fc) * gate) @ w[pre + "mlp.proj.weight"].T
            x = x + mlp
    x = _rms(x, rank(0, pp - 1)["transformer.ln_f.weight"], eps)
    head = torch.cat([rank(r, pp - 1)["lm_head.weight"] for r in range(tp)], dim=0)
    assert head.shape[0] % tp == 0 and head.shape[0] >= V
    assert not head[V:].any(), "vocabulary padding rows must be zero"
    return (x @ head.T)[:, :V]


def neox_reference_logits(config: dict, ranks: list[dict[str, torch.Tensor]], ids: torch.Tensor) -> torch.Tensor:
    """TensorRT-LLM's GPTNeoXForCausalLM as its model and converter define it (tensorrt_llm/models/
    gptneox): LayerNorms with bias at the default epsilon 1e-5 (it reads no norm_epsilon), a parallel
    residual, per rank a fused qkv of its heads as Q|K|V blocks with bias, rotate-half on the first
    head_size * rotary_pct dims at base rotary_emb_base and no scaling, gelu(fc) -> proj with biases
    (the row-parallel biases replicated, added once), ln_f, lm_head over the padded vocabulary."""
    tp, V = config["mapping"]["tp_size"], config["vocab_size"]
    assert config["mapping"]["pp_size"] == 1 and config.get("rotary_scaling") is None
    h, nh = config["hidden_size"], config["num_attention_heads"]
    hd, nl = h // nh, nh // tp
    rot = int(hd * config["rotary_pct"])
    ln = lambda x, pre: torch.nn.functional.layer_norm(x, (h,), ranks[0][pre + "weight"], ranks[0][pre + "bias"], 1e-5)
    x = ranks[0]["transformer.vocab_embedding.weight"][ids]
    T = ids.shape[0]
    inv = float(config["rotary_emb_base"]) ** -(torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)

    def rotate(t):  # [heads, T, hd]: the first `rot` dims rotate, the rest pass through
        return torch.cat((_rotate(t[..., :rot], cos, sin), t[..., rot:]), dim=-1)

    for layer in range(config["num_hidden_layers"]):
        pre = f"transformer.layers.{layer}."
        h1, h2 = ln(x, pre + "input_layernorm."), ln(x, pre + "post_attention_layernorm.")
        attn, mlp = ranks[0][pre + "attention.dense.bias"].clone(), ranks[0][pre + "mlp.proj.bias"].clone()
        for w in ranks:
            qkv = h1 @ w[pre + "attention.qkv.weight"].T + w[pre + "attention.qkv.bias"]
            q, k, v = (t.view(T, nl, hd).transpose(0, 1) for t in qkv.split(nl * hd, dim=-1))
            probs = torch.softmax(rotate(q) @ rotate(k).transpose(1, 2) / math.sqrt(hd) + causal, dim=-1)
            attn = attn + (probs @ v).transpose(0, 1).reshape(T, nl * hd) @ w[pre + "attention.dense.weight"].T
            fc = h2 @ w[pre + "mlp.fc.weight"].T + w[pre + "mlp.fc.bias"]
            mlp = mlp + torch.nn.functional.gelu(fc) @ w[pre + "mlp.proj.weight"].T
        x = x + attn + mlp
    x = ln(x, "transformer.ln_f.")
    head = torch.cat([w["lm_head.weight"] for w in ranks], dim=0)
    assert head.shape[0] % tp == 0 and not head[V:].any()
    return (x @ head.T)[:, :V]


def hf_logits(src: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0].double()


# ------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("name,tp,pp", [
    ("llama", 1, 1),
    ("gqa-tied-linear", 2, 1),
    ("gqa-tied-yarn", 4, 1),  # n_kv 2 < tp 4: each KV head repeated on two ranks
    ("llama-yarn-attn", 4, 1),
    ("qwen2-llama3", 2, 2),
    ("llama-bias-ntk", 2, 2),
    ("mistral-dynamic", 2, 1),
    ("gqa-tied-linear", 1, 2),
])
def test_reference_forward_matches_transformers(model, tmp_path, name, tp, pp):
    src = model(name)
    out = export_trtllm(src, tmp_path / "ckpt", dtype="float32", tp=tp, pp=pp)
    ids = torch.randint(0, 500, (SEQ,), generator=torch.Generator().manual_seed(tp * 10 + pp))
    expected = hf_logits(src, ids)
    got = reference_logits(out, ids)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"{name} tp{tp} pp{pp}: max |logit diff| {diff:.3g} > {TOL}"
    # And the rope is actually exercised: the unscaled base would not match a scaled model.
    config = json.loads((out / "config.json").read_text())
    if config["rotary_scaling"] is not None:
        plain = dict(config, rotary_scaling=None)
        (out / "config.json").write_text(json.dumps(plain))
        assert (reference_logits(out, ids) - expected).abs().max().item() > 5 * TOL


def test_kv_heads_repeat_when_fewer_than_tp(model, tmp_path):
    src = model("gqa-tied-yarn")  # 4 query heads, 2 KV heads, head_dim 16
    out = export_trtllm(src, tmp_path / "ckpt", dtype="float32", tp=4)
    hf = load_file(src / "model.safetensors")
    for r in range(4):
        qkv = load_file(out / f"rank{r}.safetensors")["transformer.layers.1.attention.qkv.weight"]
        q, k, v = qkv.split([16, 16, 16])
        head = r // 2  # ranks 0,1 share KV head 0; ranks 2,3 share KV head 1
        assert torch.equal(q, hf["model.layers.1.self_attn.q_proj.weight"][16 * r:16 * (r + 1)])
        assert torch.equal(k, hf["model.layers.1.self_attn.k_proj.weight"][16 * head:16 * (head + 1)])
        assert torch.equal(v, hf["model.layers.1.self_attn.v_proj.weight"][16 * head:16 * (head + 1)])


# ------------------------------------------------------------------------------------------------
# config.json: TensorRT-LLM's field names and enum values only

# PretrainedConfig plus LLaMAConfig / QWenConfig fields (tensorrt_llm/models/modeling_utils.py,
# models/llama/config.py, models/qwen/config.py), with the values TensorRT-LLM accepts.
REQUIRED = {
    "architecture": {"LlamaForCausalLM", "QWenForCausalLM"},  # keys of TensorRT-LLM's MODEL_MAP
    "dtype": {"float16", "bfloat16", "float32"},
    "logits_dtype": {"float16", "float32"},
    "vocab_size": int, "max_position_embeddings": int, "hidden_size": int, "num_hidden_layers": int,
    "num_attention_heads": int, "num_key_value_heads": int, "head_size": int, "intermediate_size": int,
    "hidden_act": {"silu"},  # TensorRT-LLM's default is gelu
    "norm_epsilon": float,
    "position_embedding_type": {"rope_gpt_neox"},  # PositionEmbeddingType; the default is learned_absolute
    "rotary_base": float,
    "rotary_scaling": (dict, type(None)),
    "mapping": dict, "quantization": dict,
    "use_parallel_embedding": {False}, "embedding_sharding_dim": {0},
    "tie_word_embeddings": bool, "mlp_bias": {False}, "attn_bias": bool,
}
# `pizoo` (an extended model's lineage): TensorRT-LLM's PretrainedConfig sets a key it does not know
# as an attribute (logging "Implicitly setting ...") and writes it back in to_dict().
OPTIONAL = {"qwen_type": {"qwen2"}, "use_logn_attn": {False}, "pizoo": dict}
# RotaryScalingType names and the keys TensorRT-LLM reads for each
SCALING_KEYS = {
    "linear": {"type", "factor"},
    "dynamic": {"type", "factor", "alpha"},
    "yarn": {"type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"},
    "llama3": {"type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def _check_value(key, value, rule):
    if isinstance(rule, set):
        assert value in rule, f"{key}={value!r} not in {rule}"
    else:
        assert isinstance(value, rule) and not (rule is int and isinstance(value, bool)), f"{key}={value!r}"


@pytest.mark.parametrize("name,tp,pp", [("llama", 1, 1), ("gqa-tied-yarn", 4, 1), ("qwen2-llama3", 2, 2),
                                        ("mistral-dynamic", 2, 1), ("gqa-tied-linear", 2, 2),
                                        ("llama-bias-ntk", 1, 1)])
def test_config_uses_only_trtllm_fields_and_values(model, tmp_path, name, tp, pp):
    src = model(name)
    out = export_trtllm(src, tmp_path / "ckpt", dtype="bfloat16", tp=tp, pp=pp)
    config = json.loads((out / "config.json").read_text())
    hf = json.loads((src / "config.json").read_text())
    assert set(config) - set(REQUIRED) <= set(OPTIONAL), f"unknown fields {set(config) - set(REQUIRED) - set(OPTIONAL)}"
    for key, rule in {**REQUIRED, **OPTIONAL}.items():
        if key in config:
            _check_value(key, config[key], rule)
        else:
            assert key in OPTIONAL, f"required field {key} missing"
    assert config["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    assert config["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert config["dtype"] == "bfloat16" and config["head_size"] == 16
    assert (config["architecture"] == "QWenForCausalLM") == (config.get("qwen_type") == "qwen2") == name.startswith("qwen2")
    scaling = config["rotary_scaling"]
    target = (hf.get("pizoo") or {}).get("target_context") or hf["max_position_embeddings"]
    assert target == 64
    if scaling is None:
        assert config["max_position_embeddings"] == 64  # the extended length
    else:
        assert set(scaling) == SCALING_KEYS[scaling["type"]]
        assert scaling["factor"] == 4.0
        if scaling["type"] == "dynamic":
            # TensorRT-LLM rescales the base past max_position_embeddings, as transformers does past L.
            assert config["max_position_embeddings"] == 16 and scaling["alpha"] == 1.0
        else:
            assert config["max_position_embeddings"] == 64
        if scaling["type"] in ("yarn", "llama3"):
            assert scaling["original_max_position_embeddings"] == 16  # never TensorRT-LLM's default 4096
    if name == "llama-bias-ntk":
        assert scaling is None and config["rotary_base"] == pytest.approx(10000.0 * 4 ** (16 / 14))
    assert "--max_seq_len 64 " in trtllm_build_command(out) + " "


# ------------------------------------------------------------------------------------------------
# The per-rank shape table


def test_tp2_shape_table_follows_the_rules(model, tmp_path):
    src = model("llama-bias")  # 4 heads, 4 KV heads, head_dim 16, hidden 64, intermediate 128, o_proj bias
    out = export_trtllm(src, tmp_path / "ckpt", dtype="float16", tp=2)
    hf_cfg = json.loads((src / "config.json").read_text())
    V, H, hd, inter, layers = hf_cfg["vocab_size"], 64, 16, 128, 2
    q_rows, kv_rows = 4 // 2 * hd, 4 // 2 * hd
    expected = {"transformer.vocab_embedding.weight": (V, H), "transformer.ln_f.weight": (H,),
                "lm_head.weight": (-(-V // 2) * 2 // 2, H)}
    for i in range(layers):
        p = f"transformer.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (H,), p + "post_layernorm.weight": (H,),
            p + "attention.qkv.weight": (q_rows + 2 * kv_rows, H), p + "attention.qkv.bias": (q_rows + 2 * kv_rows,),
            p + "attention.dense.weight": (H, q_rows), p + "attention.dense.bias": (H,),
            p + "mlp.fc.weight": (inter // 2, H), p + "mlp.gate.weight": (inter // 2, H), p + "mlp.proj.weight": (H, inter // 2),
        })
    hf = load_file(src / "model.safetensors")
    for r in range(2):
        header = read_safetensors_header(out / f"rank{r}.safetensors")  # strict: offsets, sizes, dtypes
        table = {name: (info.shape, info.dtype) for name, info in header.items()}
        assert table == {name: (shape, "F16") for name, shape in expected.items()}
        w = load_file(out / f"rank{r}.safetensors")
        rows = slice(32 * r, 32 * (r + 1))
        fused = torch.cat([hf[f"model.layers.0.self_attn.{x}_proj.weight"][rows] for x in "qkv"])
        assert torch.equal(w["transformer.layers.0.attention.qkv.weight"], fused.half())
        assert torch.equal(w["transformer.layers.0.attention.dense.weight"], hf["model.layers.0.self_attn.o_proj.weight"][:, rows].half())
        assert torch.equal(w["transformer.layers.0.attention.dense.bias"], hf["model.layers.0.self_attn.o_proj.bias"].half())
        assert torch.equal(w["transformer.layers.1.mlp.fc.weight"], hf["model.layers.1.mlp.gate_proj.weight"][64 * r:64 * (r + 1)].half())
        assert torch.equal(w["transformer.layers.1.mlp.gate.weight"], hf["model.layers.1.mlp.up_proj.weight"][64 * r:64 * (r + 1)].half())
        assert torch.equal(w["transformer.layers.1.mlp.proj.weight"], hf["model.layers.1.mlp.down_proj.weight"][:, 64 * r:64 * (r + 1)].half())


def test_lm_head_is_zero_padded_to_a_multiple_of_tp(model, tmp_path):
    src = model("llama-odd-vocab", variant="llama", vocab_size=301)
    V = json.loads((src / "config.json").read_text())["vocab_size"]
    out = export_trtllm(src, tmp_path / "ckpt", dtype="float32", tp=4)
    heads = [load_file(out / f"rank{r}.safetensors")["lm_head.weight"] for r in range(4)]
    full = torch.cat(heads)
    assert full.shape[0] == -(-V // 4) * 4 and all(h.shape == heads[0].shape for h in heads)
    assert torch.equal(full[:V], load_file(src / "model.safetensors")["lm_head.weight"])
    assert not full[V:].any()
    if V % 4:
        assert full.shape[0] > V


# ------------------------------------------------------------------------------------------------
# CLI: the command, inspect, bad input


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    # A progress bar may have been drawn (and erased) on stderr before the error.
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def test_cli_convert_prints_build_command_and_inspect_reads_it(model, tmp_path):
    src = model("gqa-tied-yarn")
    out = tmp_path / "engine-ckpt"
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(src), "--to", "trtllm", "--tp", "2", "--pp", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    command = trtllm_build_command(out)
    assert command in result.stdout
    assert command.startswith(f"trtllm-build --checkpoint_dir {out} --output_dir {out}-engine --max_seq_len 64 ")
    assert "--workers 4" in command
    assert command in trtllm_card_section(out)
    # The folder's own README may be published: its command is relative to the folder holding it.
    readme = (out / "README.md").read_text()
    assert command.replace(str(out), out.name) in readme and str(tmp_path) not in readme
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json"] + [f"rank{r}.safetensors" for r in range(4)]
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert info["format"] == "trtllm" and info["dtype"] == "float16"
    assert (info["tp_size"], info["pp_size"], info["world_size"]) == (2, 2, 4)
    assert info["context_length"] == 64 and info["original_context_length"] == 16
    assert info["rope"]["type"] == "yarn" and info["rope"]["factor"] == 4.0 and "warnings" not in info
    text = runner.invoke(app, ["inspect", str(out)])
    assert text.exit_code == 0 and "trtllm" in text.stdout and "tp 2 x pp 2 (4 ranks)" in text.stdout
    # An existing output is never replaced silently.
    again = runner.invoke(app, ["convert", str(src), "--to", "trtllm", "--out", str(out)])
    assert "already exists" in _one_line_error(again)
    assert runner.invoke(app, ["convert", str(src), "--to", "trtllm", "--out", str(out), "--overwrite"]).exit_code == 0
    assert json.loads((out / "config.json").read_text())["mapping"]["world_size"] == 1


def test_inspect_dynamic_reports_extended_context(model, tmp_path):
    out = export_trtllm(model("mistral-dynamic"), tmp_path / "ckpt", dtype="float16", tp=2)
    info = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert info["context_length"] == 64 and info["original_context_length"] == 16
    assert "--max_seq_len 64 " in info["build_command"]


@pytest.mark.parametrize("name,extra,args,needle", [
    ("llama", {}, ["--tp", "3"], "--tp: 3"),
    ("llama", {}, ["--pp", "3"], "--pp: 3"),
    ("llama", {}, ["--dtype", "int8"], "--dtype"),
    ("llama", {}, ["--tp", "8"], "num_attention_heads 4"),
    ("llama", {}, ["--pp", "4"], "num_hidden_layers 2"),
    ("kv3", dict(variant="llama", num_heads=6, num_kv_heads=3), ["--tp", "2"], "num_key_value_heads 3"),
    ("longrope", dict(variant="llama", rope=RopeConfig(type="longrope", factor=4.0, original_context=16,
                                                       short_factor=[1.0] * 8, long_factor=[2.0] * 8)), [], "longrope"),
    ("clex", dict(variant="llama", rope=RopeConfig(type="longrope", method="clex", factor=4.0, original_context=16,
                                                   short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                                                   attention_factor=1.0)), [], "CLEX"),
    ("yarn-no-truncate", dict(variant="llama", rope=BASE.scaled("yarn", 4, 16, truncate=False)), [], "truncate"),
    ("mistral-window", dict(variant="mistral", sliding_window=16), [], "sliding_window 16"),
])
def test_bad_input_is_one_line_exit_2(model, tmp_path, name, extra, args, needle):
    src = model(name, **extra)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(src), "--to", "trtllm", "--out", str(out), *args])
    assert needle in _one_line_error(result)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failed_export_leaves_nothing_behind(model, tmp_path):
    src = tmp_path / "big"
    shutil.copytree(model("llama"), src)
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6  # beyond float16's 65504
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["convert", str(src), "--to", "trtllm", "--out", str(tmp_path / "out"), "--tp", "2"])
    assert "float16 range" in _one_line_error(result) and "down_proj" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]  # no output, no temporary folder
    assert export_trtllm(src, tmp_path / "out", dtype="bfloat16", tp=2).is_dir()


def test_overwrite_replaces_only_a_checkpoint(model, tmp_path):
    """--overwrite replaces the whole --out folder, so a folder that is not a TensorRT-LLM checkpoint
    (a typo'd --out naming the user's own folder) is refused and left untouched."""
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["convert", str(model("llama")), "--to", "trtllm", "--out", str(precious),
                                      "--overwrite"])
    assert "was not written by pizoo" in _one_line_error(result)
    assert (precious / "notes.txt").read_text() == "keep me"
    out = export_trtllm(model("llama"), tmp_path / "ckpt", dtype="float32")
    result = CliRunner().invoke(app, ["convert", str(model("llama")), "--to", "trtllm", "--out", str(out),
                                      "--overwrite"])
    assert result.exit_code == 0, result.output  # a checkpoint is replaced
