"""The publish gate.

The gate (thresholds: `pizoo.recipes.GateThresholds`) compares with the base model measured at
its original context on the same tokens: ppl(target) <= max_ppl_ratio_target x base ppl(original);
ppl(original) <= max_ppl_ratio_original x base ppl(original); passkey accuracy, averaged over the
tested distances <= the target, >= min_passkey_accuracy, and at no distance below half of it. The
mean, not the threshold at every distance: with 10 trials at each of 32 distances, a model that
retrieves 95% of keys falls below 0.9 at some distance in about 94% of runs (P(<= 8 of 10) = 0.086
per distance), so a per-distance rule rejects nearly every good model. The floor at half keeps a
model that loses retrieval at some lengths (the target's, say) from passing on its average: the
same model falls below 0.45 at a distance with probability about 3e-6. A check without its measurement (no
baseline, passkey off) is reported as skipped and does not fail the gate, but a gate whose checks
were all skipped fails: it verified nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from ..errors import GateFailed, PizooError
from ..recipes import GateThresholds  # the gate's thresholds live with the recipes
from .passkey import PasskeyResult
from .tasks import TASKS


def apply_gate(thresholds: GateThresholds, *, ppl: Mapping[int, float], target: int, original: int,
               base_ppl: float | None = None, base_context: int | None = None,
               passkey: PasskeyResult | None = None, tasks: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The verdict: {passed, reasons, thresholds, checks}; one reason line per check. tasks: the
    report's `tasks` block (`pizoo.eval.task_eval.summarize`), checked against min_task_score."""
    checks: list[dict[str, Any]] = []

    def ratio_check(name: str, ctx: int, limit: float, what: str) -> None:
        if base_ppl is None:
            checks.append({"name": name, "status": "skipped", "reason": f"skipped: {what}: no baseline measured "
                           "(pass --baseline BASE)"})
            return
        if ctx not in ppl:
            checks.append({"name": name, "status": "skipped", "reason": f"skipped: {what}: ctx {ctx} not measured"})
            return
        value = ppl[ctx] / base_ppl if base_ppl > 0 else math.inf
        ok = math.isfinite(value) and value <= limit
        checks.append({"name": name, "status": "pass" if ok else "fail", "ratio": value, "limit": limit,
                       "reason": f"{'pass' if ok else 'FAIL'}: {what}: ppl at {ctx} = {ppl[ctx]:.4g} is "
                                 f"{value:.4f} x the base's {base_ppl:.4g} at {base_context} "
                                 f"({'<=' if ok else '>'} {limit:g})"})

    ratio_check("ppl_target", target, thresholds.max_ppl_ratio_target, "perplexity at the target context")
    ratio_check("ppl_original", original, thresholds.max_ppl_ratio_original,
                "short-context quality (perplexity at the original context)")
    if passkey is None:
        checks.append({"name": "passkey", "status": "skipped", "reason": "skipped: passkey retrieval not run"})
    else:
        tested = {d: a for d, a in passkey.accuracy_by_distance.items() if d <= target}
        if not tested:
            checks.append({"name": "passkey", "status": "skipped",
                           "reason": f"skipped: passkey: no distance <= the target {target} was tested"})
        else:
            limit = thresholds.min_passkey_accuracy
            floor = limit / 2
            mean = sum(tested.values()) / len(tested)
            worst = min(tested.values())
            low = sorted((d, a) for d, a in tested.items() if a < limit)
            shown = ", ".join(f"{d}: {a:.2f}" for d, a in low[:6]) + (", ..." if len(low) > 6 else "")
            below = f"; below {limit:g} at {len(low)} of them ({shown})" if low else ""
            ok = mean >= limit and worst >= floor
            verdict = (f"{'>=' if mean >= limit else '<'} {limit:g}" if worst >= floor
                       else f"but {worst:.2f} at one distance, under the floor {floor:g}")
            checks.append({"name": "passkey", "status": "pass" if ok else "fail", "mean": mean, "worst": worst,
                           "limit": limit, "floor": floor,
                           "reason": f"{'pass' if ok else 'FAIL'}: passkey accuracy {mean:.2f} on average over "
                                     f"{len(tested)} distances <= {target} ({verdict}){below}"})
    checks += [_task_check(name, limit, tasks, target) for name, limit in sorted(thresholds.min_task_score.items())]
    if all(c["status"] == "skipped" for c in checks):
        # A publish gate that verified nothing must not pass.
        checks.append({"name": "coverage", "status": "fail",
                       "reason": "FAIL: no gate check could run; give --baseline BASE or run the passkey test, "
                                 "or pass --no-gate to only measure"})
    passed = not any(c["status"] == "fail" for c in checks)
    return {"passed": passed, "reasons": [c["reason"] for c in checks], "thresholds": asdict(thresholds),
            "checks": checks}


def _task_check(name: str, limit: float, tasks: Mapping[str, Any] | None, target: int) -> dict[str, Any]:
    score = ((tasks or {}).get("tasks", {}).get(name) or {}).get("scores", {}).get(str(target))
    if score is None:
        return {"name": f"task:{name}", "status": "skipped",
                "reason": f"skipped: task {name}: not measured at the target {target}"}
    ok = score >= limit
    return {"name": f"task:{name}", "status": "pass" if ok else "fail", "score": score, "limit": limit,
            "reason": f"{'pass' if ok else 'FAIL'}: task {name} at the target {target}: score {score:.2f} "
                      f"({'>=' if ok else '<'} {limit:g})"}


def thresholds_from(gate: GateThresholds | Mapping | None) -> GateThresholds:
    if gate is None:
        return GateThresholds()
    if isinstance(gate, Mapping):
        return GateThresholds(**gate)
    return gate


def validate_thresholds(t: GateThresholds) -> None:
    for name in ("max_ppl_ratio_target", "max_ppl_ratio_original"):
        v = getattr(t, name)
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise PizooError(f"gate: {name} must be a positive number, got {v!r}")
    if not 0 <= t.min_passkey_accuracy <= 1:
        raise PizooError(f"gate: min_passkey_accuracy must be in [0, 1], got {t.min_passkey_accuracy!r}")
    for name, v in t.min_task_score.items():
        if name not in TASKS:
            raise PizooError(f"gate: min_task_score: unknown task '{name}'; use some of: {', '.join(TASKS)}")
        if not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise PizooError(f"gate: min_task_score {name} must be in [0, 1], got {v!r}")


def raise_if_failed(report: Mapping[str, Any], out: str | Path | None = None) -> None:
    """GateFailed (exit 3) with the first failing reason when the report's gate failed."""
    gate = report.get("gate")
    if gate and not gate["passed"]:
        failing = [r for r in gate["reasons"] if r.startswith("FAIL")]
        where = f" (all reasons in {Path(out) / 'eval.json'})" if out is not None else ""
        raise GateFailed(f"gate failed: {failing[0].removeprefix('FAIL: ') if failing else 'see reasons'}"
                         f"{'; ' + str(len(failing) - 1) + ' more' if len(failing) > 1 else ''}{where}")
