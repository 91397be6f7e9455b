"""LoRA(+) calibration (`--lora`) on tiny real checkpoints (CPU, float32).

Oracles: peft applies the written adapter to the base (loaded with the calibrated config, which
holds the RoPE scaling) and gets the merged model's logits (atol 1e-5); peft's own
get_peft_model_state_dict names the same keys; transformers loads the merged folder with the
scaling. A run killed with SIGKILL and resumed writes bytes identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pizoo.errors import PizooError
from pizoo.lora import lora_settings

CTX, TRAIN_LEN = 256, 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(tiny_model_factory) -> Path:
    return tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")


def _calibrate(base, out, data, **kw):
    from pizoo.train import calibrate

    args = dict(ctx=CTX, recipe="pi", data=[str(data)], steps=2, train_len=TRAIN_LEN, global_batch=2, micro_batch=1,
                lr=1e-2, progress=False, log=lambda m: None, lora=lora_settings(4))
    args.update(kw)
    return calibrate(str(base), out, **args)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def qwen3(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen3", variant="qwen3", tokenizer="bpe")


@pytest.mark.parametrize("recipe, family", [("pi", "llama"), ("yarn", "qwen3"), ("clex", "llama")])
def test_loss_decreases_and_only_adapted_weights_change(recipe, family, base, qwen3, text_file, fast_clex_recipe,
                                                        tmp_path):
    out = tmp_path / recipe
    name = str(fast_clex_recipe) if recipe == "clex" else recipe
    base = qwen3 if family == "qwen3" else base
    r = _calibrate(base, out, text_file, recipe=name, steps=12, lr=2e-2, keep_state=recipe == "clex")
    assert all(math.isfinite(x) for x in r.losses)
    first, last = sum(r.losses[:3]) / 3, sum(r.losses[-3:]) / 3
    assert last < first, (first, last)
    before, after = _tensors(base), _tensors(out)
    assert before.keys() == after.keys()  # merged: no LoRA tensors in the model folder
    for name_, t in before.items():
        changed = not torch.equal(t, after[name_])
        adapted = any(p in name_ for p in ("q_proj", "k_proj", "v_proj", "o_proj", "embed", "norm"))
        assert changed == adapted, name_  # MLP and head frozen; q,k,v,o merged; embeddings and norms
        # (Qwen3's per-head q/k norms too) trained
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["lora"]["rank"] == 4 and calib["lora"]["alpha"] == 8 and calib["lora"]["kind"] == "LongLoRA+"
    if recipe == "clex":  # the ODE frequency module kept training (W_down starts at zero)
        from safetensors.torch import load_file

        from pizoo.train import state_dir_for

        state = load_file(str(state_dir_for(out) / "step-0000012" / "model.safetensors"))
        assert state["lm.rotary.learned.w_down.weight"].abs().max() > 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_merged_equals_peft_on_base_and_checkpoints_hold_only_trainable_tensors(family, base, qwen3, text_file,
                                                                                 tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from pizoo.model import load_model
    from pizoo.train import state_dir_for

    base = qwen3 if family == "qwen3" else base
    out = tmp_path / "lora"
    _calibrate(base, out, text_file, steps=3, keep_state=True, checkpoint_every=1, lora=lora_settings(4, alpha=12))
    adapter_dir = out / "adapter"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 12 and cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    norms = {"input_layernorm", "post_attention_layernorm", "norm"} | ({"q_norm", "k_norm"} if family == "qwen3" else set())
    head = {"lm_head"} if family == "qwen3" else set()  # tiny qwen3 ties the head: the trained embedding is saved as it
    assert set(cfg["modules_to_save"]) == {"embed_tokens"} | norms | head

    ids = torch.randint(0, 512, (1, 150), generator=torch.Generator().manual_seed(0))  # past L = 64
    merged_cfg = AutoConfig.from_pretrained(out)  # the scaled RoPE the adapter was trained with
    assert merged_cfg.rope_parameters["rope_type"] == "linear" and merged_cfg.rope_parameters["factor"] == 4
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        want = merged(ids).logits[0]
        on_base = AutoModelForCausalLM.from_pretrained(base, config=merged_cfg, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(on_base, adapter_dir).eval()
        got = peft_model(ids).logits[0]
        ours = load_model(out).forward_logits(ids)[0]
    assert (got - want).abs().max().item() < 1e-5
    assert (ours - want).abs().max().item() < 1e-4

    # peft's own naming of the same adapter (the oracle for every key)
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=12, target_modules=cfg["target_modules"],
                                      modules_to_save=cfg["modules_to_save"]))
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert set(saved) == set(get_peft_model_state_dict(fresh))

    # Training checkpoints: the trainable tensors (adapters, embeddings, norms) and their AdamW state.
    step = state_dir_for(out) / "step-0000003"
    model_keys = set(load_file(str(step / "model.safetensors")))
    assert model_keys and all(k.startswith("lm.") for k in model_keys)
    assert all(("lora_" in k or "embed" in k or "norm" in k) for k in model_keys), sorted(model_keys)
    # a tied head is the embedding itself in training (one tensor); only the adapter file names it twice
    assert {f"lm.{k.removeprefix('base_model.model.')}" for k in saved if not (head and "lm_head" in k)} == model_keys
    opt_keys = {k.split("::")[0] for k in load_file(str(step / "optimizer.safetensors"))}
    assert opt_keys == model_keys


def test_changed_lora_settings_on_resume_are_refused(base, text_file, tmp_path):
    out = tmp_path / "out"
    _calibrate(base, out, text_file, steps=2, checkpoint_every=1, keep_state=True)
    with pytest.raises(PizooError, match=r"different LoRA settings \(--lora 4 .*now --lora 8 .*--no-resume"):
        _calibrate(base, out, text_file, steps=3, overwrite=True, lora=lora_settings(8))
    with pytest.raises(PizooError, match=r"different LoRA settings .*now none"):
        _calibrate(base, out, text_file, steps=3, overwrite=True, lora=None)


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from pizoo.lora import lora_settings
from pizoo.train import calibrate
base, out, data = sys.argv[1:4]
calibrate(base, out, ctx=256, recipe="pi", data=[data], steps=8, train_len=64, global_batch=2, micro_batch=1,
          lr=1e-2, progress=False, checkpoint_every=2, resume=True, log=lambda m: None, lora=lora_settings(4))
"""


def test_sigkill_and_resume_is_bit_identical(base, text_file, tmp_path):
    from test_calibrate import _wait_for_checkpoint

    from pizoo.train import state_dir_for

    def run(out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(base), str(out), str(text_file)],
                                env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    ref, out = tmp_path / "reference", tmp_path / "resumed"
    reference, victim = run(ref), run(out)
    _wait_for_checkpoint(state_dir_for(out), victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read().decode()[-2000:]
    assert not out.exists(), "the run finished before it was killed"
    resumed = run(out)
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    assert reference.wait() == 0, reference.stderr.read().decode()[-2000:]
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "adapter" / f).read_bytes() == (ref / "adapter" / f).read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--lora", "0"], "--lora 0: the rank must be a positive integer"),
    (["--lora", "-3"], "--lora -3: the rank must be a positive integer"),
    (["--lora", "80"], "--lora 80: above the width of the adapted layers (64)"),
    (["--lora", "4", "--lora-targets", "q,x"], "--lora-targets q,x: unknown target 'x'"),
    (["--lora", "4", "--lora-trainable", "bias"], "--lora-trainable bias: unknown 'bias'"),
    (["--lora", "4", "--lora-alpha", "0"], "--lora-alpha 0.0: must be a positive number"),
    (["--lora-alpha", "8"], "--lora-alpha: only with --lora RANK"),
    (["--lora", "4", "--recipe", "dynamic-ntk"], "--lora with recipe 'dynamic-ntk': dynamic scales RoPE at inference"),
])
@pytest.mark.parametrize("command", ["calibrate", "extend"])
def test_bad_lora_input_is_one_line_exit_2(command, args, message, base, tmp_path):
    from pizoo.cli import app

    extra = ["--dry-run", "--hardware", "cpu"] if command == "extend" else ["--out", str(tmp_path / "o")]
    r = CliRunner().invoke(app, [command, str(base), "--ctx", "256", *args, *extra])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# The plan


def _dry_run(*args: str) -> tuple[int, str]:
    from pizoo.cli import app

    r = CliRunner().invoke(app, ["extend", "llama-13b", "--ctx", "16384", "--hardware", "h100", "--dry-run", "--json",
                                 *args])
    return r.exit_code, r.output


def test_plan_llama_13b_at_16k_fits_one_h100_with_lora_and_full_advice_names_lora(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = _dry_run("--lora", "16")
    assert code == 0, output
    plan = json.loads(output)
    m = plan["memory"]
    assert plan["fits"] and m["fits"] and plan["lora"]["rank"] == 16 and plan["lora"]["trainable"] == ["embed", "norm"]
    n = plan["params"]
    assert 12.5e9 < n < 13.5e9
    # The frozen base in bf16 (2 bytes per parameter), no gradients or AdamW state for it.
    assert 2 * (n - 32000 * 5120) < m["weights"] < 2.2 * n
    assert m["trainable_params"] == 32000 * 5120 + 81 * 5120 + 40 * 16 * 4 * 2 * 5120
    assert m["optimizer"] == 8 * m["trainable_params"] and m["peak"] < 80 * 1024**3 * 0.9
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing

    code, output = _dry_run()
    assert code == 2
    assert "DOES NOT FIT" not in output  # --json prints the plan as JSON, then the refusal
    plan = json.loads(output[:output.rindex("}") + 1])
    assert not plan["fits"] and "--lora 16" in plan["advice"][0] and "fits on H100 SXM" in plan["advice"][0]
    assert "error: " in output and "--lora 16" in output


def test_plan_lora_flops_and_memory_below_full():
    from pizoo.plan import estimate_memory, named_hardware, train_flops_per_token
    from pizoo.synthetic import tiny_config

    cfg = tiny_config("llama", hidden_size=256, intermediate_size=688, num_layers=4, head_dim=64, vocab_size=2048)
    hw = named_hardware("h100")
    lora = lora_settings(8)
    full = estimate_memory(cfg, hw, train_len=4096, activation_checkpointing=True)
    low = estimate_memory(cfg, hw, train_len=4096, activation_checkpointing=True, lora=lora)
    assert low.gradients < full.gradients / 4 and low.weights < full.weights
    f_full = train_flops_per_token(cfg, 512, activation_checkpointing=False)
    f_lora = train_flops_per_token(cfg, 512, activation_checkpointing=False, lora=lora)
    assert 0.6 * f_full < f_lora < f_full  # weight gradients of the frozen matrices are skipped


def _measured_step_bytes(folder: Path, lora, train_len: int) -> int:
    """Bytes one CPU training step holds at its peak, counted tensor by tensor: parameters, gradients,
    AdamW state, and every tensor autograd saves for backward (by storage, views counted once)."""
    from pizoo.checkpoint import open_checkpoint
    from pizoo.train import CausalLMLoss, _build_training_model, _Dist, _load_base_weights, _trainable

    ckpt = open_checkpoint(folder)
    cfg = ckpt.config
    wrapper = _build_training_model(cfg, cfg.rope, cfg.original_context, torch.device("cpu"), _Dist(), 0, False,
                                    1024, lora)
    _load_base_weights(wrapper, ckpt)
    assert isinstance(wrapper, CausalLMLoss)
    params = {p.untyped_storage().data_ptr() for p in wrapper.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (1, train_len + 1), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(train_len)[None]
    wrapper.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = wrapper(ids[:, :-1], pos, ids[:, 1:])
    loss.backward()
    trainable = _trainable(wrapper)
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-3)
    opt.step()
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    weights = sum(nbytes(p) for p in wrapper.parameters())
    grads = sum(nbytes(p.grad) for p in trainable.values())
    state = sum(nbytes(v) for st in opt.state.values() for v in st.values() if v.ndim)
    return weights + grads + state + sum(saved.values())


@pytest.mark.parametrize("lora", [lora_settings(8), None], ids=["lora", "full"])
def test_planner_memory_within_15_percent_of_a_measured_cpu_step(lora, tiny_model_factory):
    from pizoo.plan import Hardware, estimate_memory
    from pizoo.synthetic import tiny_config

    shape = dict(hidden_size=256, intermediate_size=688, num_layers=4, head_dim=64, vocab_size=2048,
                 max_position_embeddings=512)
    folder = tiny_model_factory("llama-small", variant="llama", tokenizer="bpe", **shape)
    cfg = tiny_config("llama", **shape)
    cpu = Hardware("cpu", "CPU", 1, 64 * 1024**3, 50e9, 0.3, "test")
    est = estimate_memory(cfg, cpu, train_len=512, activation_checkpointing=False, lora=lora)
    planned = est.weights + est.gradients + est.optimizer + est.activations
    measured = _measured_step_bytes(folder, lora, 512)
    assert abs(planned / measured - 1) < 0.15, (planned, measured)


def test_card_says_how_to_use_the_adapter_and_reproduce_names_lora():
    from pizoo.card import CardFacts, render_card, reproduce_command

    lora = lora_settings(16, targets="q,k,v,o").to_dict()  # as calibration.json records it (resolved)
    calib = {"base_model": {"hub_id": "org/base"}, "ctx": 16384, "method": "linear", "lora": lora,
             "recipe": {"name": "pi"}}
    config = {"pizoo": {"base_model": "org/base", "target_context": 16384}, "max_position_embeddings": 16384}
    card = render_card(CardFacts(repo_id="me/base-16k", config=config, calibration=calib,
                                 files=[("model.safetensors", 10), ("adapter/adapter_config.json", 1),
                                        ("adapter/adapter_model.safetensors", 5)]))
    assert "### PEFT adapter" in card and "LongLoRA+ (rank 16, alpha 32 on q,k,v,o + trainable embed, norm)" in card
    assert 'PeftModel.from_pretrained(base, "me/base-16k", subfolder="adapter")' in card
    assert 'AutoConfig.from_pretrained("me/base-16k")' in card
    no_adapter = render_card(CardFacts(repo_id="me/x", config=config, calibration={**calib, "lora": None}))
    assert "PEFT adapter" not in no_adapter
    cmd = reproduce_command(calib, {"command": {"model": "org/base", "ctx": 16384, "lora": lora}}, config)
    assert cmd.endswith("--lora 16 --lora-alpha 32 --lora-targets q,k,v,o --lora-trainable embed,norm"), cmd


# ------------------------------------------------------------------------------------------------
# --offload: FSDP2's CPUOffloadPolicy


@pytest.mark.parametrize("lora", [None, lora_settings(4)], ids=["full", "lora"])
def test_offload_runs_through_fsdp2_and_writes_the_same_model(lora, base, text_file, tmp_path):
    """The CPU test of the GPU path's logic: a one-process group, FSDP2 with CPUOffloadPolicy,
    the same losses and bit-identical weights as the plain run; its training checkpoint is FSDP's
    sharded layout (one rank), which any world size resumes (tests/test_distributed.py)."""
    import torch.distributed as dist

    plain = _calibrate(base, tmp_path / "plain", text_file, steps=3, lora=lora)
    off = _calibrate(base, tmp_path / "off", text_file, steps=3, lora=lora, offload=True, keep_state=True,
                     checkpoint_every=2)
    assert not dist.is_initialized()  # the group pizoo started is torn down
    assert off.losses == plain.losses
    a, b = _tensors(tmp_path / "plain"), _tensors(tmp_path / "off")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    from pizoo.train import state_dir_for

    last = sorted(state_dir_for(tmp_path / "off").glob("step-*"))[-1]
    assert json.loads((last / "manifest.json").read_text())["world_size"] == 1


def test_plan_offload_fits_a_full_fine_tune_on_one_gpu_and_advice_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = _dry_run()
    plan = json.loads(output[:output.rindex("}") + 1])
    assert code == 2 and any("--offload fits on the GPU" in a for a in plan["advice"])
    code, output = _dry_run("--offload")
    assert code == 0, output
    plan = json.loads(output)
    m = plan["memory"]
    assert plan["offload"] and plan["fits"] and m["peak"] < 80 * 1024**3 * 0.9
    n = plan["params"]
    assert m["host_state"] == m["weights"] + m["gradients"] + m["optimizer"] and m["host_state"] >= 16 * n
