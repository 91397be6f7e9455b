"""bench/quality/run.py's bookkeeping: the cell cache and how measured cells become claims and tables.

The measurements themselves need SmolLM2-135M and hours of CPU; these tests feed the report code
cells as the measurements write them and check what it concludes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "bench" / "quality" / "run.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def ppl_cell(key: str, ppl: float) -> dict:
    return {"key": key, "identity": {}, "ppl": ppl, "tokens": 16383, "windows": 1, "seconds": 1.0}


def test_cell_cache_returns_only_matching_identity(quality, tmp_path):
    identity = {"model": "abc", "ctx": 8192}
    quality.write_cell(tmp_path, "training-free/pi/ppl@8192", identity, {"ppl": 12.5})
    assert quality.read_cell(tmp_path, "training-free/pi/ppl@8192", identity)["ppl"] == 12.5
    # A changed model or setting is a different measurement: the stale cell is not reused.
    assert quality.read_cell(tmp_path, "training-free/pi/ppl@8192", {**identity, "model": "def"}) is None
    assert set(quality.all_cells(tmp_path)) == {"training-free/pi/ppl@8192"}


def test_claims_met_and_missed(quality):
    cells = {k: ppl_cell(k, v) for k, v in {
        "training-free/none/ppl@8192": 10.0,
        "training-free/none/ppl@16384": 250.0,  # extrapolation hurts, but stays below 10^3
        "training-free/pi/ppl@16384": 14.0,
        "training-free/yarn/ppl@16384": 300.0,  # worse than not scaling at all
        "calibrated/none/step-0/ppl@8192": 10.0,
        "calibrated/pi/step-200/ppl@32768": 9.5,
    }.items()}
    targets, missing = quality.claim_targets(cells)
    verdicts = {t["name"]: t["met"] for t in targets}
    assert verdicts["claim 1: no scaling at 16k (2x its context): perplexity >= 1000"] is False
    assert any(name.startswith("claim 2: training-free pi") and met for name, met in verdicts.items())
    assert any(name.startswith("claim 2: training-free yarn") and not met for name, met in verdicts.items())
    assert any(name.startswith("claim 3: pi") and met for name, met in verdicts.items())
    # What was not measured is said, not silently dropped.
    assert any(m.startswith("claim 2 for ntk") for m in missing)
    assert any(m.startswith("claim 3 for clex") for m in missing)
    assert any(m.startswith("claim 4 for pi") for m in missing)


def test_tables_mark_missing_cells(quality):
    cells = {"training-free/none/ppl@16384": ppl_cell("training-free/none/ppl@16384", 4321.0)}
    tf = quality.training_free_table(cells)
    assert tf["rows"][0] == ["none (extrapolation)", "not run", "4,321", ""]
    cal = quality.calibrated_table({})
    assert len(cal["rows"]) == 1 + len(quality.CALIBRATED_RECIPES) * len(quality.CALIBRATED_STEPS)
    assert all(cell == "not run" for row in cal["rows"] for cell in row[2:])


def test_claim_3_is_judged_on_the_most_trained_checkpoint_measured(quality):
    cells = {k: ppl_cell(k, v) for k, v in {
        "calibrated/none/step-0/ppl@8192": 7.5,
        "calibrated/pi/step-0/ppl@32768": 90.0,
        "calibrated/pi/step-50/ppl@32768": 41.0,
    }.items()}
    targets, missing = quality.claim_targets(cells)
    claim3 = [t for t in targets if t["name"].startswith("claim 3: pi")]
    assert [t["name"].split(",")[0] for t in claim3] == ["claim 3: pi after 50 steps"]
    assert claim3[0]["met"] is False and claim3[0]["value"] == pytest.approx(41.0 / 7.5, abs=1e-3)
    # The planned 200-step checkpoint is still reported as missing.
    assert any(m.startswith("claim 3 for pi") for m in missing)


def test_findings_follow_the_numbers(quality):
    def cells(values: dict) -> dict:
        return {k: ppl_cell(k, v) for k, v in values.items()}

    mild = quality.findings(cells({"training-free/none/ppl@8192": 8.0, "training-free/none/ppl@16384": 24.0,
                                   "training-free/pi/ppl@16384": 26.0, "training-free/pi/ppl@8192": 26.0,
                                   "training-free/yarn/ppl@16384": 8.1}))
    assert mild[0].startswith("Claim 1 (extrapolation > 10^3) does not reproduce")
    assert mild[1].startswith("Claim 2 (interpolation beats extrapolation without training) holds for yarn")
    assert "fails for pi" in mild[1]
    collapse = quality.findings(cells({"training-free/none/ppl@8192": 8.0, "training-free/none/ppl@16384": 2500.0,
                                       "training-free/pi/ppl@16384": 26.0}))
    assert collapse[0].startswith("Claim 1 (extrapolation > 10^3) reproduces")
    assert "fails" not in collapse[1]
    passkey = {f"calibrated/{r}/step-200/passkey@32768": {"k_max": k, "accuracy_by_distance": {"16384": 1.0, "32768": a}}
               for r, k, a in (("pi", 32768, 1.0), ("yarn", 16384, 0.0), ("clex", 16384, 0.0))}
    (claim4,) = quality.findings(passkey)
    assert claim4.startswith("Claim 4") and "reproduces for pi after 200 steps" in claim4


def test_only_selects_tasks_by_name_prefix(quality, tmp_path):
    settings = quality.Settings(work=tmp_path, protocol=quality.PROTOCOLS["gpu"], dtype=None, threads=None,
                                stop_at=None)
    tasks = quality.plan_tasks(settings, tmp_path / "base", None)
    assert quality.select_tasks(tasks, None) == tasks
    probe = quality.select_tasks(tasks, "lr-probe, train/lr-probe")
    assert [t.name for t in probe][:2] == ["train/lr-probe/pi", "train/lr-probe/yarn"]
    assert all("lr-probe" in t.name for t in probe) and len(probe) == 2 + 4 + 2
    # Evaluations wait for their model: nothing was trained in this empty work folder.
    assert not any(t.needs() for t in probe if t.stage == "eval")


def test_claim_3_finding_names_who_reproduces_it(quality):
    cells = {k: ppl_cell(k, v) for k, v in {
        "calibrated/none/step-0/ppl@8192": 7.0,
        "calibrated/pi/step-200/ppl@32768": 9.0, "calibrated/pi/step-200/ppl@8192": 9.2,
        "calibrated/yarn/step-200/ppl@32768": 6.0, "calibrated/yarn/step-200/ppl@8192": 6.2,
    }.items()}
    (claim3,) = quality.findings(cells)
    assert "yarn reproduces it; pi at the papers' lr does not" in claim3
    assert "pi 9.00 at 32k (1.29x; 9.20 at 8k)" in claim3
    cells["calibrated/pi/step-200/ppl@32768"] = ppl_cell("calibrated/pi/step-200/ppl@32768", 20.0)
    cells["calibrated/yarn/step-200/ppl@32768"] = ppl_cell("calibrated/yarn/step-200/ppl@32768", 8.0)
    assert "no recipe reproduces it" in quality.findings(cells)[0]
