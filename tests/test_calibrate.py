"""`pizoo calibrate`: the engine on tiny real checkpoints (CPU, float32).

Oracles: transformers loads every output folder with the new scaling and context, and its logits
equal pizoo's on the same folder (atol 1e-4, float32); a run killed with SIGKILL and resumed writes
weights bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pizoo.errors import PizooError

CTX = 256  # the tiny models are pre-trained at 64 tokens: a 4x extension
TRAIN_LEN = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(tiny_model_factory) -> Path:
    return tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")


def _calibrate(base, out, data, **kw):
    from pizoo.train import calibrate

    args = dict(ctx=CTX, recipe="pi", data=[str(data)], steps=2, train_len=TRAIN_LEN, global_batch=2, micro_batch=1,
                lr=1e-3, progress=False, log=lambda m: None)
    args.update(kw)
    return calibrate(str(base), out, **args)


def test_loss_decreases_over_30_steps(base, text_file, tmp_path):
    out = tmp_path / "pi"
    r = _calibrate(base, out, text_file, steps=30, global_batch=2, micro_batch=2, checkpoint_every=10)
    assert len(r.losses) == 30 and all(math.isfinite(x) for x in r.losses)
    first, last = sum(r.losses[:5]) / 5, sum(r.losses[-5:]) / 5
    assert last < first, (first, last)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert metrics[0]["lr"] == pytest.approx(0.1e-3)  # linear warmup starts at 10% of the peak
    assert metrics[-1]["lr"] == pytest.approx(1e-3)  # pi: constant after warmup (20 steps)
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["method"] == "linear" and calib["factor"] == 4 and calib["ctx"] == CTX
    assert calib["original_context"] == 64 and calib["steps"] == 30 and calib["global_batch"] == 2
    assert calib["tokens"] == 30 * 2 * TRAIN_LEN and calib["train_len"] == TRAIN_LEN
    assert calib["final_loss"] == pytest.approx(r.losses[-1])
    assert len(calib["base_model"]["sha256"]) == 64 and calib["recipe"]["name"] == "pi"
    assert len(calib["data"]["fingerprint"]) == 64 and calib["data"]["documents"] >= 1
    cfg = json.loads((out / "config.json").read_text())
    # A local folder with no Hub origin has no public identity: never its path, only its folder's name.
    assert "base_model" not in cfg["pizoo"] and cfg["pizoo"]["recipe"] == "pi"
    assert cfg["pizoo"]["base_identity"] == {"source": "local", "local_name": base.name}
    assert cfg["pizoo"]["base_sha256"] == calib["base_model"]["sha256"] and str(base) not in json.dumps(cfg)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not (tmp_path / "pi.calibrate-state").exists()  # the training state is removed on success


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits[0], model.config


@pytest.mark.parametrize("recipe", ["pi", "ntk", "yarn", "llama3", "clex", "dynamic-ntk"])
def test_output_loads_in_transformers(recipe, base, text_file, fast_clex_recipe, tmp_path):
    from pizoo.model import load_model

    out = tmp_path / recipe
    steps = 0 if recipe == "dynamic-ntk" else 2
    name = str(fast_clex_recipe) if recipe == "clex" else recipe
    _calibrate(base, out, text_file, recipe=name, steps=steps, lr=1e-2)
    ids = torch.randint(0, 512, (1, 150), generator=torch.Generator().manual_seed(0))  # past L = 64
    hf, hf_cfg = _hf_logits(out, ids)
    ours = load_model(out).forward_logits(ids)[0].detach()
    assert (hf - ours).abs().max().item() < 1e-4
    raw = json.loads((out / "config.json").read_text())
    params = hf_cfg.rope_parameters
    if recipe == "dynamic-ntk":
        assert hf_cfg.max_position_embeddings == 64 and raw["pizoo"]["target_context"] == CTX
        assert params["rope_type"] == "dynamic" and params["factor"] == 4
        return
    assert hf_cfg.max_position_embeddings == CTX
    if recipe == "ntk":
        assert params["rope_type"] == "default" and params["rope_theta"] == pytest.approx(10000 * 4 ** (16 / 14))
        assert raw["pizoo"]["rope_method"] == "ntk"
    elif recipe == "clex":
        assert params["rope_type"] == "longrope" and params["short_factor"] == [1.0] * 8
        assert params["attention_factor"] == 1.0 and raw["pizoo"]["rope_method"] == "clex"
        assert params["long_factor"] == json.loads((out / "calibration.json").read_text())["clex"]["long_factor"]
    else:
        hf_type = {"pi": "linear"}.get(recipe, recipe)
        assert params["rope_type"] == hf_type and params["factor"] == 4
        if recipe in ("yarn", "llama3"):
            assert params["original_max_position_embeddings"] == 64


def test_clex_baked_factors_reproduce_trained_module(base, text_file, fast_clex_recipe, tmp_path):
    """The longrope factors written to config.json give the trained ODE's frequencies at the target."""
    from safetensors.torch import load_file

    from pizoo.checkpoint import open_checkpoint
    from pizoo.clex import clex_module_for
    from pizoo.config import RopeConfig
    from pizoo.rope import inv_freq_for, rope_ntk
    from pizoo.train import state_dir_for

    out = tmp_path / "clex"
    _calibrate(base, out, text_file, recipe=str(fast_clex_recipe), steps=3, lr=5e-2, keep_state=True)
    baked = open_checkpoint(out).config.rope
    assert baked.type == "longrope" and baked.method == "clex"
    state = load_file(str(state_dir_for(out) / "step-0000003" / "model.safetensors"))
    module = clex_module_for(baked, 16)
    module.load_state_dict({k.removeprefix("lm.rotary.learned."): v for k, v in state.items()
                            if k.startswith("lm.rotary.learned.")})
    module.eval()
    trained = module(CTX)
    from_config, attn = inv_freq_for(baked, 16, CTX)
    assert attn == 1.0
    assert torch.allclose(from_config, trained, rtol=1e-6, atol=0)
    # Training moved the ODE away from its NTK starting point (W_down is no longer zero).
    ntk, _ = rope_ntk(RopeConfig(type="ntk", factor=7.0, original_context=64), 16, CTX)  # alpha = 2t - 1, t = 4
    assert (trained / ntk - 1).abs().max() > 1e-4


def test_clex_module_starts_at_ntk():
    from pizoo.clex import ClexFrequencies
    from pizoo.config import RopeConfig
    from pizoo.rope import rope_ntk

    m = ClexFrequencies(10000.0, 16, 64, max_factor=8, time_dt=0.01)
    for seq_len, t in ((64, 1), (65, 2), (256, 4), (10_000, 8)):
        assert m.scale_for(seq_len) == t
        ntk, _ = rope_ntk(RopeConfig(type="ntk", factor=2 * t - 1, original_context=64), 16, seq_len)
        assert torch.allclose(m(seq_len), ntk, rtol=1e-6, atol=0)
    m.train()
    m(256).sum().backward()
    assert m.w_down.weight.grad.abs().sum() > 0 and torch.isfinite(m.w_down.weight.grad).all()


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from pizoo.train import calibrate
base, out, data = sys.argv[1:4]
calibrate(base, out, ctx=256, recipe="pi", data=[data], steps=12, train_len=64, global_batch=2, micro_batch=1,
          lr=1e-3, progress=False, checkpoint_every=2, resume=True, log=lambda m: None)
"""


def _run_script(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _wait_for_checkpoint(state: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run has written its first training checkpoint (or ended, or timed out)."""
    deadline = time.time() + timeout
    while not list(state.glob("step-*/trainer.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def test_sigkill_and_resume_is_bit_identical(base, text_file, tmp_path):
    from pizoo.train import state_dir_for

    ref, out = tmp_path / "reference", tmp_path / "resumed"
    reference = _run_script(base, ref, text_file)
    victim = _run_script(base, out, text_file)
    state = state_dir_for(out)
    _wait_for_checkpoint(state, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read().decode()[-2000:]
    assert not out.exists(), "the run finished before it was killed"
    killed_at = json.loads(sorted(state.glob("step-*/trainer.json"))[-1].read_text())["step"]
    assert 2 <= killed_at < 12
    resumed = _run_script(base, out, text_file)
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    assert reference.wait() == 0, reference.stderr.read().decode()[-2000:]
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    ref_losses = [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    our_losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert our_losses == ref_losses and len(ref_losses) == 12


def test_ctrl_c_saves_and_exits_cleanly(base, text_file, tmp_path):
    from pizoo.train import state_dir_for

    out = tmp_path / "interrupted"
    proc = _run_script(base, out, text_file)
    state = state_dir_for(out)
    _wait_for_checkpoint(state, proc)
    proc.send_signal(signal.SIGINT)
    proc.wait()
    err = proc.stderr.read().decode()
    assert "Interrupted: interrupted at step" in err and "rerun the same command" in err
    saved = json.loads(sorted(state.glob("step-*/trainer.json"))[-1].read_text())
    assert saved["step"] < 12 and saved["data_position"] == 2 * saved["step"]
    assert not out.exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(base, text_file, tmp_path):
    from pizoo.train import state_dir_for

    out = tmp_path / "diverged"
    with pytest.raises(PizooError, match=r"loss is (nan|inf).*last good checkpoint \(step \d+\)"):
        _calibrate(base, out, text_file, steps=20, lr=1e30, checkpoint_every=1)
    assert list(state_dir_for(out).glob("step-*/model.safetensors"))
    assert not out.exists()


def test_refuses_bad_context_and_too_little_data(base, text_file, tmp_path):
    with pytest.raises(PizooError, match="--ctx 64: must be greater than the model's original context"):
        _calibrate(base, tmp_path / "a", text_file, ctx=64)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words")
    with pytest.raises(PizooError, match="fewer than one sequence"):
        _calibrate(base, tmp_path / "b", tiny)
    (tmp_path / "c").mkdir()
    with pytest.raises(PizooError, match="already exists"):
        _calibrate(base, tmp_path / "c", text_file)


def test_position_sampling_spreads_over_target():
    from pizoo.train import _generator, pose_positions, sorted_random_positions

    g = _generator(0, "test")
    for _ in range(20):
        p = pose_positions(64, 256, g)
        assert p.shape == (64,) and p[0] == 0 and p.max() < 256
        assert (p.diff() >= 1).all() and (p.diff() == 1).sum() == 62  # two contiguous chunks
        s = sorted_random_positions(64, 256, g)
        assert s[0] == 0 and s[-1] == 255 and (s.diff() >= 1).all() and s.unique().numel() == 64


def test_cli_calibrate_and_errors(base, text_file, tmp_path):
    from pizoo.cli import app

    runner = CliRunner()
    out = tmp_path / "cli-out"
    r = runner.invoke(app, ["calibrate", str(base), "--ctx", "128", "--data", str(text_file), "--steps", "1",
                            "--train-len", "32", "--global-batch", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and json.loads((out / "config.json").read_text())["max_position_embeddings"] == 128
    r = runner.invoke(app, ["calibrate", str(base), "--ctx", "32", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "error: --ctx 32" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("kw, message", [
    ({"lr": -1.0}, r"--lr -1.0: must be a positive number"),
    ({"global_batch": 0}, r"--global-batch 0: must be >= 1"),
    ({"micro_batch": 0}, r"--micro-batch 0: must be >= 1"),
    ({"train_len": 0}, r"--train-len 0: must be between 2"),
])
def test_refuses_zero_and_negative_settings(base, text_file, tmp_path, kw, message):
    # 0 used to mean "the default" (falsy) and a negative lr reached torch as a traceback.
    with pytest.raises(PizooError, match=message):
        _calibrate(base, tmp_path / "out", text_file, **kw)
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_never_replaced(base, text_file, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(PizooError, match="is a file, not a folder"):
        _calibrate(base, target, text_file, overwrite=True)
    assert target.read_text() == "keep me"


def test_resume_past_the_requested_steps_is_refused(base, text_file, tmp_path):
    from pizoo.train import state_dir_for

    out = tmp_path / "short"
    _calibrate(base, out, text_file, steps=3, checkpoint_every=1, keep_state=True)
    saved = sorted(state_dir_for(out).glob("step-*"))[-1]
    import shutil

    shutil.rmtree(out)
    # A checkpoint at step 3 cannot give a 2-step model: it used to write 3 steps' weights as "steps": 2.
    with pytest.raises(PizooError, match=r"saved at step 3, past --steps 2"):
        _calibrate(base, out, text_file, steps=2)
    assert saved.is_dir() and not out.exists()


def test_too_little_data_leaves_no_state_and_the_error_on_its_own_line(base, tmp_path):
    from pizoo.cli import app
    from pizoo.train import state_dir_for

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words")
    out = tmp_path / "none"
    with pytest.raises(PizooError, match="fewer than one sequence"):
        _calibrate(base, out, tiny, progress=True)
    assert not state_dir_for(out).exists() and not out.exists()
    r = CliRunner().invoke(app, ["calibrate", str(base), "--ctx", "128", "--data", str(tiny), "--steps", "1",
                                 "--train-len", "32", "--global-batch", "1", "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert any(line.startswith("error: --data") for line in r.output.splitlines()), r.output


def test_base_path_is_recorded_absolute_so_eval_finds_it_from_anywhere(base, tmp_path, monkeypatch):
    from pizoo.eval import find_base_model
    from pizoo.train import calibrate

    monkeypatch.chdir(base.parent)
    calibrate(base.name, tmp_path / "out", ctx=CTX, recipe="pi", steps=0, progress=False, log=lambda m: None)
    monkeypatch.chdir(tmp_path)
    found = find_base_model(tmp_path / "out")
    assert found == str(base.resolve()) and Path(found).is_dir()
