"""Long-context tasks (RULER-style): deterministic generators, the scorer on hand-made answers, an
oracle that reads each prompt and answers it scores 1.0 (and a silent model 0.0), prompts fill
their length, the CLI's tasks table, base beside extended, the gate's min_task_score and bad input.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pizoo.cli import app
from pizoo.config import RopeConfig
from pizoo.errors import PizooError
from pizoo.eval.passkey import build_passkey_trials, score_passkey_trials
from pizoo.eval.task_eval import measure_task
from pizoo.eval.tasks import (
    GROUPS,
    TASKS,
    HaystackText,
    build_samples,
    effective_length,
    parse_tasks,
    string_match_all,
)
from pizoo.eval.text import TextEncoder
from pizoo.model import load_model
from pizoo.synthetic import sample_text

ORIGINAL = 256


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PIZOO_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def base_model(tiny_model_factory) -> Path:
    return tiny_model_factory("tasks-base", variant="llama", tokenizer="bpe", max_position_embeddings=ORIGINAL)


@pytest.fixture(scope="module")
def extended_model(tiny_model_factory, base_model) -> Path:
    rope = RopeConfig(type="linear", factor=2.0, original_context=ORIGINAL)
    path = tiny_model_factory("tasks-extended", variant="llama", tokenizer="bpe", rope=rope,
                              max_position_embeddings=2 * ORIGINAL)
    return path


@pytest.fixture(scope="module")
def encoder(base_model) -> TextEncoder:
    return TextEncoder(base_model)


@pytest.fixture(scope="module")
def text() -> HaystackText:
    return HaystackText(sample_text(40_000))


def _count(encoder: TextEncoder):
    return lambda prompt: len(encoder.prefix) + len(encoder.plain(prompt))


# ------------------------------------------------------------------------------------------------
# Definitions, scoring, effective length


def test_scorer_on_hand_made_answers():
    assert string_match_all("The special magic numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("only 1234567 here", ["1234567", "7654321"]) == 0.5
    assert string_match_all("VAR abcde", ["ABCDE"]) == 1.0  # case-insensitive, like RULER
    assert string_match_all("", ["x"]) == 0.0
    assert string_match_all("12345", ["123456"]) == 0.0


def test_effective_length_is_the_longest_length_that_stays_above_the_threshold():
    assert effective_length({1024: 0.95, 2048: 0.86, 4096: 0.5, 8192: 0.9}) == 2048
    assert effective_length({1024: 0.5, 2048: 0.95}) == 0
    assert effective_length({1024: 0.856}) == 1024  # at the threshold counts


def test_task_names_and_groups():
    assert parse_tasks("passkey,niah,vt,cwe,fwe") == list(TASKS)
    assert parse_tasks("ruler") == GROUPS["ruler"] and "passkey" not in GROUPS["ruler"]
    assert parse_tasks("vt, niah_single_1,vt") == ["niah_single_1", "vt"]  # the stable order, once each
    assert len(GROUPS["niah"]) == 8
    with pytest.raises(PizooError, match="unknown task 'niahh'"):
        parse_tasks("niahh")
    with pytest.raises(PizooError, match="no task given"):
        parse_tasks(" , ")


@pytest.mark.parametrize("name", list(TASKS))
def test_generators_are_deterministic_and_fill_the_length(name, encoder, text):
    count = _count(encoder)
    length = 2048
    a = build_samples(name, length, 3, 7, text, count)
    b = build_samples(name, length, 3, 7, text, count)
    other = build_samples(name, length, 3, 8, text, count)
    assert not isinstance(a, str), a
    assert [(s.prompt, s.answers) for s in a] == [(s.prompt, s.answers) for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in other]
    assert len({s.prompt for s in a}) == 3  # samples differ from one another
    budget = length - TASKS[name].max_new_tokens
    for s in a:
        n = count(s.prompt)
        assert budget * 0.9 <= n <= budget, (name, n, budget)
        assert s.answers and all(s.answers)


def test_a_length_too_short_for_a_task_is_a_stated_skip(encoder, text):
    reason = build_samples("cwe", 128, 2, 0, text, _count(encoder))
    assert isinstance(reason, str) and "cwe at 128: skipped" in reason and "need" in reason


# ------------------------------------------------------------------------------------------------
# The oracle: reads the prompt like a perfect model would and writes the answer


def _solve(prompt: str) -> str:
    if "special magic" in prompt:
        needles = dict()
        for key, value in re.findall(r"One of the special magic \w+ for (\S+) is: (\S+?)\.(?=\s|$)", prompt):
            needles.setdefault(key, []).append(value)
        query = re.search(r"for (.+?) mentioned in the provided text\?", prompt.split("\n")[-1]).group(1)
        return ", ".join(v for k in re.split(r", and |, ", query) for v in needles[k])
    if "chain(s) of variable assignment" in prompt:
        section = prompt.split("Memorize and track")[-1]
        value = re.findall(r"assigned the value (\d+)", section)[-1]
        held, assignments = {value}, re.findall(r"VAR (\w+) = (?:VAR )?(\w+)", section)
        names: list[str] = []
        for _ in assignments:
            for var, source in assignments:
                if source in held and var not in held:
                    held.add(var)
                    names.append(var)
        return " ".join(names)
    if "numbered list of words" in prompt:
        section = prompt.split("Below is a numbered list")[-1].split("Question:")[0]
        return " ".join(w for w, _ in Counter(re.findall(r"\d+\. (\w+)", section)).most_common(10))
    if "coded text" in prompt:
        section = prompt.split("coded words.")[-1].split("Question:")[0]
        return " ".join(w for w, _ in Counter(w for w in section.split() if w != "...").most_common(3))
    return re.findall(r"The pass key is (\d+)", prompt)[-1]


def _oracle(encoder: TextEncoder):
    def generate(prompts, max_new_tokens, done):
        return [encoder.plain(" " + _solve(encoder.tokenizer.decode(p))) for p in prompts]

    return generate


@pytest.mark.parametrize("name", list(TASKS))
def test_an_oracle_that_copies_the_needle_scores_one_and_silence_scores_zero(name, encoder, text):
    def batch_size(n):
        return 4

    got = measure_task(_oracle(encoder), encoder, name, 2048, samples=3, seed=1, text=text, batch_size=batch_size)
    assert got["score"] == 1.0, got["example"]
    silent = measure_task(lambda prompts, n, done: [[] for _ in prompts], encoder, name, 2048, samples=3, seed=1,
                          text=text, batch_size=batch_size)
    assert silent["score"] == 0.0


# ------------------------------------------------------------------------------------------------
# Generation serves passkey


def test_passkey_by_generation_equals_the_one_pass_check(extended_model):
    model = load_model(extended_model)
    encoder = TextEncoder(extended_model)
    trials = build_passkey_trials(encoder, [200, 300, 512], 3, seed=0)
    # A random tiny model rarely retrieves; feed it its own greedy answers as keys too, so both
    # verdicts occur and the equality is not trivially all zeros.
    greedy = score_passkey_trials(model, trials, "greedy")
    generated = score_passkey_trials(model, trials, "generate")
    assert generated == greedy
    from pizoo.eval.generate import greedy_generate

    own = [type(t)(t.distance, t.key, t.prompt_ids, greedy_generate(model, [t.prompt_ids], 3)[0]) for t in trials]
    assert score_passkey_trials(model, own, "greedy") == [1.0] * len(own)
    assert score_passkey_trials(model, own, "generate") == [1.0] * len(own)


# ------------------------------------------------------------------------------------------------
# pizoo eval --tasks


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_eval_tasks_base_beside_extended(extended_model, base_model, tmp_path):
    out = tmp_path / "eval"
    r = run_cli("eval", extended_model, "--baseline", base_model, "--ctx", "256,512", "--tasks",
                "passkey,niah_single_1,vt", "--samples", "2", "--no-gate", "--passkey-distances", "2",
                "--passkey-trials", "1", "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "eval.json").read_text())
    tasks = report["tasks"]
    assert set(tasks["tasks"]) == {"passkey", "niah_single_1", "vt"}
    assert tasks["lengths"] == [256, 512] and tasks["threshold"] == 0.856 and tasks["samples"] == 2
    for entry in tasks["tasks"].values():
        assert set(entry["scores"]) <= {"256", "512"}
        assert all(0.0 <= v <= 1.0 for v in entry["scores"].values())
        assert isinstance(entry["effective_length"], int)
    # vt's shortest prompt (a worked example and the question) does not fit 256 tokens: a stated skip.
    assert any("vt at 256: skipped" in s for s in tasks["skipped"])
    assert any("vt at 256: skipped" in n for n in report["notes"])
    # The base runs the same tasks at the lengths it supports (<= its original 256).
    base_tasks = report["baseline"]["tasks"]
    assert base_tasks["lengths"] == [256] and set(base_tasks["tasks"]) == set(tasks["tasks"])
    assert "tasks" in r.output and "mean" in r.output and "effective length" in r.output
    assert (out / "ppl.png").is_file()

    # The card's evaluation section shows the tasks, the base beside, and the effective length.
    from pizoo.card import CardFacts, render_card

    config = json.loads((Path(extended_model) / "config.json").read_text())
    card = render_card(CardFacts(repo_id="alice/tiny-512", config=config, evaluation=report))
    assert "| task | 256 | 512 |" in card and "| niah_single_1 |" in card and "| mean |" in card
    eff = tasks["effective_length"]
    assert (f"Effective length: {eff:,} tokens" if eff is not None else "Effective length: not measured") in card
    assert "the base's:" in card


def test_eval_task_bad_input_is_one_line(extended_model, tmp_path):
    for args, expect in ((("--tasks", "bogus"), "--tasks: unknown task 'bogus'"),
                         (("--tasks", "niah", "--samples", "0"), "--samples 0: must be at least 1")):
        r = run_cli("eval", extended_model, "--no-gate", "--no-baseline", "--no-passkey", "--ctx", "256", *args,
                    "--out", tmp_path / "x")
        assert r.exit_code == 2, r.output
        assert expect in r.output and "Traceback" not in r.output


def test_gate_min_task_score_from_a_recipe(extended_model, base_model, tmp_path):
    recipe = tmp_path / "strict.toml"
    recipe.write_text('name = "strict"\nmethod = "linear"\ncitation = "tests"\n[train]\nenabled = false\n'
                      '[gate]\nmax_ppl_ratio_target = 1000.0\nmax_ppl_ratio_original = 1000.0\n'
                      'min_passkey_accuracy = 0.0\n[gate.min_task_score]\nniah_single_1 = 0.5\n')
    out = tmp_path / "eval"
    r = run_cli("eval", extended_model, "--baseline", base_model, "--recipe", recipe, "--samples", "1",
                "--passkey-distances", "2", "--passkey-trials", "1", "--out", out)
    assert r.exit_code == 3, r.output  # a random tiny model finds no needle
    report = json.loads((out / "eval.json").read_text())
    check = next(c for c in report["gate"]["checks"] if c["name"] == "task:niah_single_1")
    assert check["status"] == "fail" and check["limit"] == 0.5
    assert "task niah_single_1 at the target 512" in check["reason"]
    assert "niah_single_1" in report["tasks"]["tasks"]  # the gate added the task

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nmethod = "linear"\ncitation = "tests"\n[gate.min_task_score]\nniah = 0.5\n')
    r = run_cli("eval", extended_model, "--recipe", bad, "--out", tmp_path / "y")
    assert r.exit_code == 2 and "[gate.min_task_score] niah: unknown task" in r.output
