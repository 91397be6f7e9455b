"""The CUDA paths, on a real GPU: bf16 SDPA forward, calibration with bf16 autocast, perplexity, and
(with two GPUs or more) FSDP under torchrun with NCCL.

CI has no GPU, so these skip there; the CPU tests cover the same logic in float32. Run them where a
GPU is: `python3 -m pytest -q tests/test_gpu.py`. Tolerances: float32 on the GPU against float32 on
the CPU within 1e-4 (TF32 is off in torch by default); bf16 logits within 5% of the logits' spread
(bf16 keeps 8 significant bits); bf16 perplexity within 2% of float32's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")

CTX = 256
TRAIN_LEN = 64


@pytest.fixture(scope="module")
def base(tiny_model_factory) -> Path:
    return tiny_model_factory("llama-gqa-tied", variant="llama-gqa-tied", tokenizer="bpe")


def _tokens(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, n), generator=g)


def test_cuda_forward_matches_cpu(base):
    from pizoo.model import load_model

    cpu = load_model(base, dtype=torch.float32)
    ids = _tokens(192, cpu.config.vocab_size)  # 3x the tiny model's original 64 positions
    with torch.no_grad():
        ref = cpu(ids)
        f32 = load_model(base, device="cuda", dtype=torch.float32)(ids.cuda()).float().cpu()
        bf16 = load_model(base, device="cuda", dtype=torch.bfloat16)(ids.cuda()).float().cpu()
    assert (f32 - ref).abs().max().item() < 1e-4
    spread = ref.std().item()
    assert (bf16 - ref).abs().mean().item() < 0.05 * spread, ((bf16 - ref).abs().mean().item(), spread)


def test_cuda_calibrate_learns_and_loads_on_cpu(base, text_file, tmp_path):
    from pizoo.model import load_model
    from pizoo.train import calibrate

    out = tmp_path / "yarn"
    r = calibrate(str(base), out, ctx=CTX, recipe="yarn", data=[str(text_file)], steps=30, train_len=TRAIN_LEN,
                  global_batch=2, micro_batch=2, lr=1e-3, device="cuda", progress=False, log=lambda m: None)
    assert len(r.losses) == 30 and all(math.isfinite(x) for x in r.losses)
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["device"].startswith("cuda")
    # The output is written in the base's dtype (float32 here): the CPU and GPU forwards agree.
    ids = _tokens(CTX, 512, seed=1)[:1]
    with torch.no_grad():
        on_cpu = load_model(out, dtype=torch.float32)(ids)
        on_gpu = load_model(out, device="cuda", dtype=torch.float32)(ids.cuda()).cpu()
    assert (on_cpu - on_gpu).abs().max().item() < 1e-4


def test_cuda_perplexity_matches_cpu(base):
    from pizoo.eval.perplexity import sliding_window_perplexity
    from pizoo.model import load_model

    doc = _tokens(1000, 512, seed=2)[0]
    ref = sliding_window_perplexity(load_model(base, dtype=torch.float32), [doc], ctx=128, stride=64)
    f32 = sliding_window_perplexity(load_model(base, device="cuda", dtype=torch.float32), [doc], ctx=128, stride=64)
    bf16 = sliding_window_perplexity(load_model(base, device="cuda", dtype=torch.bfloat16), [doc], ctx=128, stride=64)
    assert f32.tokens == ref.tokens == bf16.tokens
    assert abs(f32.ppl / ref.ppl - 1) < 1e-4
    assert abs(bf16.ppl / ref.ppl - 1) < 0.02, (bf16.ppl, ref.ppl)


NCCL_SCRIPT = """
import json, os, sys
from pizoo.train import calibrate
base, out, data, result = sys.argv[1:5]
r = calibrate(base, out, ctx=256, recipe="pi", data=[data], steps=4, train_len=64, global_batch=2, micro_batch=1,
              lr=1e-3, progress=False, checkpoint_every=2, log=lambda m: None)
if int(os.environ.get("RANK", "0")) == 0:
    json.dump({"losses": r.losses, "world": int(os.environ.get("WORLD_SIZE", "1"))}, open(result, "w"))
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="FSDP needs 2 ranks, and NCCL one GPU per rank (with one, torchrun runs no FSDP)")
def test_torchrun_nccl_fsdp_matches_single_process(base, text_file, tmp_path):
    """FSDP2 with NCCL and bf16 mixed precision (one GPU per rank) against the plain autocast loop."""
    import socket

    n = torch.cuda.device_count()
    script = tmp_path / "run.py"
    script.write_text(NCCL_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(base),
                           str(tmp_path / "dist"), str(text_file), str(tmp_path / "dist.json")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    one = subprocess.run([sys.executable, str(script), str(base), str(tmp_path / "one"), str(text_file),
                          str(tmp_path / "one.json")], capture_output=True, text=True)
    assert dist.returncode == 0, (dist.stdout + dist.stderr)[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    rd, r1 = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("dist", "one"))
    assert rd["world"] == n > 1
    calib = json.loads((tmp_path / "dist" / "calibration.json").read_text())
    assert calib["world_size"] == n
    # FSDP casts parameters to bf16 for the forward, the plain loop autocasts matmuls: both bf16
    # compute, so the losses agree to bf16's precision, not bit for bit.
    assert max(abs(a - b) for a, b in zip(rd["losses"], r1["losses"])) < 2e-2, (rd["losses"], r1["losses"])


def test_cuda_evaluate_model_with_passkey_matches_cpu(base, text_file, tmp_path):
    """`pizoo eval`'s library entry point on the GPU (bf16 default) against the CPU (float32)."""
    from pizoo.eval import evaluate_model

    def run(device: str) -> dict:
        return evaluate_model(str(base), ctx=[128], data=[str(text_file)], split="all", stride=64, passkey=True,
                              passkey_window=256, passkey_distances=2, passkey_trials=2, baseline=False, gate=False,
                              device=device, plot=False, progress=False, cache=False, out=tmp_path / device)

    gpu, cpu = run("cuda"), run("cpu")
    g, c = gpu["results"][0], cpu["results"][0]
    assert g["tokens"] == c["tokens"] and g["tokens"] > 0
    assert abs(g["ppl"] / c["ppl"] - 1) < 0.02, (g["ppl"], c["ppl"])
    assert gpu["passkey"]["window"] == cpu["passkey"]["window"] == 256
    assert gpu["passkey"]["accuracy_by_distance"].keys() == cpu["passkey"]["accuracy_by_distance"].keys()
    assert len(gpu["passkey"]["accuracy_by_distance"]) == 2
