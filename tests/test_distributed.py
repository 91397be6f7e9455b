"""FSDP under torchrun on CPU (gloo).

Two processes give the loss curve of one with the same global batch; a two-process run killed with
SIGKILL after a sharded checkpoint and resumed writes weights bit-identical to an uninterrupted
two-process run; the checkpoint's per-rank files hold shards, never the whole model; and a single
process resumes it exactly (resharding from the saved row ranges).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
from pizoo.lora import lora_settings
from pizoo.train import calibrate
base, out, data, result, mode = sys.argv[1:6]
lora = lora_settings(4) if mode == "lora" else None
r = calibrate(base, out, ctx=256, recipe="pi", data=[data], steps=4, train_len=64, global_batch=4, micro_batch=1,
              lr=1e-2 if lora else 1e-3, progress=False, checkpoint_every=2, log=lambda m: None, lora=lora,
              keep_state=lora is not None)
if int(os.environ.get("RANK", "0")) == 0:
    json.dump({"losses": r.losses, "world": int(os.environ.get("WORLD_SIZE", "1"))}, open(result, "w"))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo needs a POSIX system")
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_torchrun_two_processes_match_one(mode, tiny_model_factory, text_file, tmp_path):
    base = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    data = text_file
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(base),
                            str(tmp_path / "two"), str(data), str(tmp_path / "two.json"), mode],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    one = subprocess.run([sys.executable, str(script), str(base), str(tmp_path / "one"), str(data),
                          str(tmp_path / "one.json"), mode], env=env, capture_output=True, text=True)
    out2 = two.communicate()[0].decode()
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, out2[-3000:]
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert r2["world"] == 2 and len(r1["losses"]) == len(r2["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(r1["losses"], r2["losses"])) < 1e-4
    calib = json.loads((tmp_path / "two" / "calibration.json").read_text())
    assert calib["world_size"] == 2 and calib["global_batch"] == 4
    # Only rank 0 wrote: one output folder, no leftovers from the other rank.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".two")]
    assert leftovers == []
    if mode == "lora":  # the sharded training checkpoint holds only the trainable tensors
        manifest = json.loads((tmp_path / "two.calibrate-state" / "step-0000004" / "manifest.json").read_text())
        owners = {k.split("::")[0] for k in manifest["tensors"]}
        assert owners and all(("lora_" in k or "embed" in k or "norm" in k) for k in owners), sorted(owners)
        assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()

    from safetensors.torch import load_file

    w1, w2 = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


RESUMABLE_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from pizoo.train import calibrate
base, out, data, steps = sys.argv[1:5]
calibrate(base, out, ctx=256, recipe="pi", data=[data], steps=int(steps), train_len=64, global_batch=4, micro_batch=1,
          lr=1e-3, progress=False, checkpoint_every=2, resume=True, log=lambda m: None)
"""
RESUMABLE_ARGS = dict(ctx=256, recipe="pi", train_len=64, global_batch=4, micro_batch=1, lr=1e-3, progress=False,
                      checkpoint_every=2, resume=True, log=lambda m: None)
STEPS = 10


def _torchrun(script: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
                             *map(str, args)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc): torchrun starts each worker in its own session."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the torchrun agent and its workers at once, as a crashed node would."""
    workers = _children(proc.pid)
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in workers:  # reaped by init once the agent is gone; wait until they have really exited
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]:
            time.sleep(0.01)


def _losses(folder: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills torchrun workers found through /proc")
def test_torchrun_sharded_checkpoint_kill_and_resume(tiny_model_factory, text_file, tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pizoo.train import calibrate, state_dir_for

    base = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    data = text_file
    script = tmp_path / "run.py"
    script.write_text(RESUMABLE_SCRIPT)
    ref, out = tmp_path / "reference", tmp_path / "resumed"
    reference = _torchrun(script, base, ref, data, STEPS)
    victim = _torchrun(script, base, out, data, STEPS)
    state = state_dir_for(out)
    deadline = time.time() + 300
    while not list(state.glob("step-*/manifest.json")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    _kill_job(victim)
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read().decode()[-3000:]
    assert not out.exists(), "the run finished before it was killed"
    step_dir = sorted(state.glob("step-*"))[-1]
    manifest = json.loads((step_dir / "manifest.json").read_text())
    killed_at = manifest["step"]
    assert 2 <= killed_at < STEPS and manifest["world_size"] == 2 and manifest["data_position"] == 4 * killed_at

    # One file per rank; every parameter and AdamW moment is split by rows, none held whole by a rank.
    assert sorted(p.name for p in step_dir.iterdir()) == ["manifest.json", "rank0.safetensors", "rank1.safetensors",
                                                          "trainer.json"]
    full_bytes = 0
    for key, meta in manifest["tensors"].items():
        if key.endswith("::step"):
            assert meta["placement"] == "Replicate()" and meta["shape"] == []
            continue
        assert meta["placement"] == "Shard(0)", key
        rows = [s["rows"] for s in meta["shards"]]
        assert sum(rows) == meta["shape"][0] and max(rows) < meta["shape"][0], (key, rows)
        assert [s["offset"] for s in meta["shards"]] == [0, rows[0]]
        full_bytes += 4 * meta["shape"][0] * (meta["shape"][1] if len(meta["shape"]) > 1 else 1)
    for r, info in enumerate(manifest["ranks"]):
        with safe_open(str(step_dir / info["file"]), framework="pt") as f:
            for key, meta in manifest["tensors"].items():
                shape = f.get_slice(key).get_shape()
                if meta["placement"] == "Shard(0)":
                    assert shape == [meta["shards"][r]["rows"], *meta["shape"][1:]], (r, key, shape)
            assert "rng::cpu" in f.keys() and info["rng"] == ["rng::cpu"]
        assert info["bytes"] < 0.6 * full_bytes  # about half of params + exp_avg + exp_avg_sq
    names = [k for k in manifest["tensors"] if "::" not in k]
    assert {f"{n}::{s}" for n in names for s in ("exp_avg", "exp_avg_sq", "step")} | set(names) == set(manifest["tensors"])

    # A single process resumes the two-process checkpoint exactly: with no steps left, the weights
    # it writes are the saved shards put back together, bit for bit.
    for name in ("one-exact", "one-continued"):
        shutil.copytree(state, state_dir_for(tmp_path / name))
    resumed = _torchrun(script, base, out, data, STEPS)  # runs while the single-process checks below do
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exact = calibrate(str(base), tmp_path / "one-exact", data=[str(data)], steps=killed_at, **RESUMABLE_ARGS)
        assert exact.resumed_from == killed_at
        written = load_file(str(tmp_path / "one-exact" / "model.safetensors"))
        shards = [load_file(str(step_dir / f"rank{r}.safetensors")) for r in (0, 1)]
        for name in names:
            whole = torch.cat([shards[0][name], shards[1][name]])
            assert torch.equal(written[name.removeprefix("lm.")], whole), name
        # ... and continues with the optimizer state intact: the two-process loss curve within 1e-4.
        continued = calibrate(str(base), tmp_path / "one-continued", data=[str(data)], steps=STEPS, **RESUMABLE_ARGS)
    finally:
        torch.set_num_threads(threads)
    out_resumed = resumed.communicate()[0].decode()
    assert resumed.returncode == 0, out_resumed[-3000:]
    out_ref = reference.communicate()[0].decode()
    assert reference.returncode == 0, out_ref[-3000:]
    ref_losses = _losses(ref)
    assert len(ref_losses) == STEPS and continued.resumed_from == killed_at
    assert max(abs(a - b) for a, b in zip(continued.losses[killed_at:], ref_losses[killed_at:])) < 1e-4

    # Two processes resumed from the killed run: the same losses and bit-identical final weights.
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert _losses(out) == ref_losses
    assert json.loads((out / "calibration.json").read_text())["world_size"] == 2
    assert not state.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".resumed")] == []
