"""FSDP under torchrun on CPU (gloo): two processes give the loss curve of one with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
from pizoo.train import calibrate
base, out, data, result = sys.argv[1:5]
r = calibrate(base, out, ctx=256, recipe="pi", data=[data], steps=4, train_len=64, global_batch=4, micro_batch=1,
              lr=1e-3, progress=False, checkpoint_every=2, log=lambda m: None)
if int(os.environ.get("RANK", "0")) == 0:
    json.dump({"losses": r.losses, "world": int(os.environ.get("WORLD_SIZE", "1"))}, open(result, "w"))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo needs a POSIX system")
def test_torchrun_two_processes_match_one(tiny_model_factory, tmp_path):
    from pizoo.synthetic import sample_text

    base = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    data = tmp_path / "prose.txt"
    data.write_text(sample_text(40_000))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(base),
                            str(tmp_path / "two"), str(data), str(tmp_path / "two.json")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    one = subprocess.run([sys.executable, str(script), str(base), str(tmp_path / "one"), str(data),
                          str(tmp_path / "one.json")], env=env, capture_output=True, text=True)
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

    from safetensors.torch import load_file

    w1, w2 = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
