"""Recipes as data: the built-in TOML files, validation errors that name file and key, the CLI."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from pizoo.errors import PizooError
from pizoo.recipes import GateThresholds, list_recipes, load_recipe

BUILTIN = ["clex", "dynamic-ntk", "llama3", "ntk", "pi", "yarn"]


def test_builtin_recipes_load_with_paper_hyperparameters():
    assert list_recipes() == BUILTIN
    pi = load_recipe("pi")
    assert pi.method == "linear" and pi.betas == (0.9, 0.95) and pi.weight_decay == 0.0
    assert pi.warmup_steps == 20 and pi.warmup_start == 0.1 and pi.schedule == "constant"
    assert pi.steps == 1000 and pi.global_batch == 64
    assert pi.lr_for(7_000_000_000) == 2e-5 and pi.lr_for(65_000_000_000) == 1e-5
    assert "2306.15595" in pi.citation
    yarn = load_recipe("yarn")
    assert yarn.steps == 400 and yarn.rope == {"beta_fast": 32.0, "beta_slow": 1.0}
    clex = load_recipe("clex")
    assert clex.schedule == "cosine" and clex.warmup_for(1000) == 30 and clex.positions == "sorted-random"
    assert clex.rope == {"max_factor": 16.0, "param_factor": 1, "act": "silu", "time_dt": 0.01}
    dyn = load_recipe("dynamic-ntk")
    assert dyn.train is False and dyn.steps == 0 and dyn.method == "dynamic"
    for name in BUILTIN:
        r = load_recipe(name)
        assert r.gate == GateThresholds(1.10, 1.05, 0.9) and r.citation


def test_recipe_builds_the_scaled_rope():
    from pizoo.config import RopeConfig

    rope = load_recipe("llama3").rope_config(RopeConfig(theta=500000.0), 4.0, 8192)
    assert rope.type == "llama3" and rope.factor == 4.0 and rope.original_context == 8192
    assert rope.low_freq_factor == 1.0 and rope.high_freq_factor == 4.0


def _write(tmp_path, text: str):
    p = tmp_path / "mine.toml"
    p.write_text('name = "mine"\nmethod = "linear"\ncitation = "me"\n' + text)
    return p


@pytest.mark.parametrize("body, pattern", [
    ("[train]\nstepz = 10\n", r"mine\.toml: \[train\] stepz: unknown key"),
    ("colour = 1\n", r"mine\.toml: colour: unknown key"),
    ("[train]\nsteps = \"ten\"\n", r"mine\.toml: \[train\] steps: must be int, got 'ten'"),
    ("[train]\nlr = -1e-5\n", r"mine\.toml: \[train\] lr: must be > 0"),
    ("[train]\nbetas = [0.9, 1.5]\n", r"mine\.toml: \[train\] betas: must be two numbers in \[0, 1\)"),
    ("[train]\nschedule = \"linear\"\n", r"mine\.toml: \[train\] schedule: must be one of constant, cosine"),
    ("[train]\nglobal_batch = 0\n", r"mine\.toml: \[train\] global_batch: must be >= 1"),
    ("[train]\nwarmup_start = 0\n", r"mine\.toml: \[train\] warmup_start: must be in \(0, 1\]"),
    ("[train]\nlr = [{ max_params = 1e9, lr = 2e-5 }, { max_params = 1e8, lr = 1e-5 }]\n",
     r"mine\.toml: \[train\] lr: max_params must increase"),
    ("[gate]\nmin_passkey_accuracy = 2.0\n", r"mine\.toml: \[gate\] min_passkey_accuracy: must be in \[0, 1\]"),
    ("[rope]\nbeta_fast = 32.0\n", r"mine\.toml: \[rope\] beta_fast: unknown key"),  # not a linear parameter
])
def test_validation_errors_name_file_and_key(tmp_path, body, pattern):
    with pytest.raises(PizooError, match=pattern):
        load_recipe(_write(tmp_path, body))


def test_validation_of_method_and_rope_values(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('method = "rope-magic"\ncitation = "x"\n')
    with pytest.raises(PizooError, match=r"bad\.toml: method: must be one of"):
        load_recipe(p)
    p.write_text('method = "yarn"\ncitation = "x"\n[rope]\nbeta_fast = 1.0\nbeta_slow = 2.0\n')
    with pytest.raises(PizooError, match=r"bad\.toml: \[rope\] beta_fast: must exceed beta_slow"):
        load_recipe(p)
    p.write_text('method = "clex"\ncitation = "x"\n[rope]\nact = "relu"\n')
    with pytest.raises(PizooError, match=r"bad\.toml: \[rope\] act: must be silu or tanh"):
        load_recipe(p)
    p.write_text('method = "pi"\ncitation = "x"\n[train\n')
    with pytest.raises(PizooError, match=r"bad\.toml: invalid TOML"):
        load_recipe(p)
    with pytest.raises(PizooError, match="--recipe nope: no such recipe; use one of clex, dynamic-ntk"):
        load_recipe("nope")


def test_user_recipe_with_lr_table(tmp_path):
    r = load_recipe(_write(tmp_path, "[train]\nsteps = 5\nlr = [{ max_params = 1e6, lr = 1e-3 }, "
                                      "{ max_params = inf, lr = 1e-4 }]\n[gate]\nmax_ppl_ratio_target = 1.2\n"))
    assert r.name == "mine" and r.steps == 5 and r.lr_for(10) == 1e-3 and r.lr_for(10**9) == 1e-4
    assert math.isinf(r.lr[-1].max_params) and r.gate.max_ppl_ratio_target == 1.2
    assert r.to_dict()["lr"][-1] == {"max_params": "inf", "lr": 1e-4}


def test_cli_recipes_list_and_show(tmp_path):
    from pizoo.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["recipes", "list"])
    assert r.exit_code == 0 and all(name in r.output for name in BUILTIN)
    r = runner.invoke(app, ["recipes", "show", "yarn"])
    assert r.exit_code == 0 and "beta_fast = 32.0" in r.output and "2309.00071" in r.output
    r = runner.invoke(app, ["recipes", "show", str(_write(tmp_path, "[train]\nlr = 0\n"))])
    assert r.exit_code == 2 and "[train] lr: must be > 0" in r.output and "Traceback" not in r.output


def test_pi_lr_by_model_size_from_the_quality_study():
    from pizoo.recipes import load_recipe

    pi = load_recipe("pi")
    assert pi.lr_for(134_515_008) == 1e-4  # SmolLM2-135M: bench/quality's learning-rate probe
    assert pi.lr_for(1_000_000_001) == 2e-5 and load_recipe("yarn").lr_for(134_515_008) == 2e-5
