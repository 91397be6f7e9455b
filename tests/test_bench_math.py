"""The arithmetic behind the benchmarks' reported figures: PaLM FLOPs per token, MFU, targets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


b3 = _load("b3_train_throughput")
common = _load("common")

DIMS = dict(hidden=4, layers=2, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)


def test_matmul_params_by_hand():
    # per layer: q,o 4x4 each (32) + k,v 4x2 each (16) + MLP 3x4x8 (96) = 144; x2 layers + head 10x4
    assert b3.matmul_params(**DIMS) == 2 * 144 + 40


def test_matmul_params_match_pizoo_config():
    from pizoo.synthetic import tiny_config

    for variant in ("llama", "llama-gqa-tied"):
        cfg = tiny_config(variant)
        norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
        expected = cfg.num_non_embedding_params() - norms + cfg.vocab_size * cfg.hidden_size
        assert b3.matmul_params(**b3.config_dims(cfg)) == expected


def test_palm_flops_per_token_and_causal_halving():
    n = b3.matmul_params(**DIMS)
    full = b3.flops_per_token(n, layers=2, heads=2, head_dim=2, seq_len=16)
    half = b3.flops_per_token(n, layers=2, heads=2, head_dim=2, seq_len=16, causal_halved=True)
    assert full == 6 * 328 + 12 * 2 * 2 * 2 * 16 == 3504
    assert half == 6 * 328 + 6 * 2 * 2 * 2 * 16 == 2736


def test_mfu_and_peak_lookup():
    assert b3.mfu(1000.0, 3504.0, 3.504e6) == pytest.approx(1.0)
    assert b3.mfu(500.0, 3504.0, 3.504e6) == pytest.approx(0.5)
    assert b3.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert b3.peak_flops_for("Some Unknown GPU") is None


def test_target_reports_how_much_it_missed():
    met = common.target("time ratio", 0.4, 0.5)
    missed = common.target("time ratio", 0.75, 0.5)
    speed = common.target("speedup", 1.1, 1.3, op=">=")
    assert met["met"] and "miss" not in met
    close = common.target("rss ratio", 0.501, 0.5)
    assert not missed["met"] and "1.50x" in missed["miss"]
    assert not speed["met"] and "18.2%" in speed["miss"]
    assert not close["met"] and "0.2%" in close["miss"]


def test_b3_loops_train_on_cpu(tiny_model_factory, tmp_path, capsys):
    """B3's three loops (its GPU measurement, run here on CPU): each trains on the same sequences,
    reports its recompute setting, and the like-for-like loops start from the same loss."""
    import json

    import torch

    torch.manual_seed(0)
    model = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    seqs = torch.randint(0, 512, (3, 33), generator=torch.Generator().manual_seed(0)).tolist()
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(seqs))
    reports = {}
    for impl in ("pizoo", "pizoo-planned", "transformers"):
        b3.child_main(impl, model, 32, tokens, warmup=1, device="cpu")
        line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(b3.RESULT_PREFIX)][-1]
        reports[impl] = json.loads(line[len(b3.RESULT_PREFIX):])
    assert all(len(r["losses"]) == 3 and r["tokens_per_s"] > 0 and not r["oom"] for r in reports.values())
    assert reports["pizoo"]["checkpointing"] is True and reports["transformers"]["checkpointing"] is True
    # A tiny model fits anywhere: the planner turns recomputation off.
    assert reports["pizoo-planned"]["checkpointing"] is False
    # transformers' labels loss drops the last of the 32 targets, and both run bf16 autocast: the first
    # losses (same weights, same tokens) agree to about 1%, not exactly.
    assert abs(reports["pizoo"]["losses"][0] - reports["transformers"]["losses"][0]) < 0.05
    assert reports["pizoo"]["losses"][:2] == pytest.approx(reports["pizoo-planned"]["losses"][:2], abs=1e-4)
