"""Output: eval.json, the plot, the terminal table."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import PizooError

PLOT_FILE = "ppl.png"


def check_report_folder(out: str | Path) -> Path:
    """`out` may receive eval.json and ppl.png: a new or existing folder, whose eval.json and ppl.png, if
    there, are an earlier pizoo report's (its eval.json carries pizoo_version). A file of the user's
    by either name is never replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PizooError(f"--out {out}: exists and is not a folder")
    present = [name for name in ("eval.json", PLOT_FILE) if os.path.lexists(out / name)]
    if present and not _is_pizoo_report(out / "eval.json"):
        raise PizooError(f"--out {out}: holds {' and '.join(present)} that pizoo did not write (no pizoo eval.json), "
                         "so eval will not replace them; choose another --out")
    return out


def _is_pizoo_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "pizoo_version" in report and not path.is_symlink()


def write_report(report: dict[str, Any], out: str | Path, *, plot: bool = True) -> Path:
    """Write out/eval.json and out/ppl.png (when matplotlib is installed), all or nothing: both are
    rendered first, ppl.png is renamed into place only once eval.json's bytes are written, and a
    failure (a full disk, Ctrl-C) leaves neither, nor a folder this call created."""
    from ..fsutil import atomic_file, new_dirs

    out = check_report_folder(out)
    png = perplexity_png(report) if plot else None
    if png is not None:
        report["plot"] = PLOT_FILE
    elif plot:
        msg = "matplotlib is not installed: no plot (pip install 'pizoo[plot]')"
        if msg not in report["notes"]:
            report["notes"].append(msg)
    path = out / "eval.json"
    with new_dirs(out), atomic_file(path, "w") as f:
        f.write(json.dumps(_json_safe(report), indent=2) + "\n")
        if png is not None:
            with atomic_file(out / PLOT_FILE, "wb") as image:
                image.write(png)
    return path


def _json_safe(obj: Any) -> Any:
    """inf/nan are not JSON: write them as strings so every reader can parse eval.json."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def perplexity_png(report: Mapping[str, Any]) -> bytes | None:
    """PNG of perplexity against context length, the model vs its baseline, and (when tasks ran) a
    second panel of task scores against length, base and extended; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = report.get("tasks")
    if tasks:
        fig, (ax, ax_tasks) = plt.subplots(1, 2, figsize=(12.0, 4.2), dpi=120)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    name = Path(report["model"]["path"]).name

    def series(results):
        pts = [(r["ctx"], r["ppl"]) for r in results if isinstance(r["ppl"], (int, float)) and math.isfinite(r["ppl"])]
        return [p[0] for p in pts], [p[1] for p in pts]

    x, y = series(report["results"])
    ax.plot(x, y, "o-", label=f"{name} (context {report['model']['context_length']})", color="tab:blue")
    ys = list(y)
    base = report.get("baseline")
    if base:
        bx, by = series(base["results"])
        ax.plot(bx, by, "s--", label=f"base: {Path(base['model']['path']).name} (context {base['original_context']})",
                color="tab:gray")
        if isinstance(base["ppl_at_original"], (int, float)) and math.isfinite(base["ppl_at_original"]):
            ax.axhline(base["ppl_at_original"], color="tab:gray", linewidth=0.8, linestyle=":")
        ys += by
    ax.axvline(report["model"]["original_context"], color="tab:red", linewidth=0.8, linestyle=":",
               label="original context")
    ax.set_xscale("log", base=2)
    if ys and max(ys) / max(min(ys), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xticks(sorted({r["ctx"] for r in report["results"]} | ({r["ctx"] for r in base["results"]} if base else set())))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{int(v):,}"))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Sliding-window perplexity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if tasks:
        _plot_tasks(ax_tasks, report, matplotlib)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    return image.getvalue()


def _plot_tasks(ax, report: Mapping[str, Any], matplotlib) -> None:
    """Task score against length: the average over the tasks (bold) and each task (thin), the
    model solid and its base dashed, with RULER's threshold."""
    name = Path(report["model"]["path"]).name
    base = (report.get("baseline") or {}).get("tasks")
    lengths: set[int] = set()
    for label, block, style, color in ((name, report["tasks"], "-", "tab:blue"), ("base", base, "--", "tab:gray")):
        if not block:
            continue
        for task, entry in block["tasks"].items():
            pts = sorted((int(k), v) for k, v in entry["scores"].items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, linewidth=0.7, alpha=0.35)
        avg = sorted((int(k), v) for k, v in block["average"].items())
        if avg:
            ax.plot([p[0] for p in avg], [p[1] for p in avg], "o" + style, color=color, linewidth=2,
                    label=f"{label}: mean of {len(block['tasks'])} tasks")
            lengths |= {p[0] for p in avg}
    ax.axhline(report["tasks"]["threshold"], color="tab:red", linewidth=0.8, linestyle=":",
               label=f"threshold {report['tasks']['threshold']:g}")
    ax.set_xscale("log", base=2)
    if lengths:
        ax.set_xticks(sorted(lengths))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{int(v):,}"))
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score (string-match recall)")
    ax.set_title("Long-context tasks")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def format_report(report: Mapping[str, Any]) -> str:
    """The terminal table: perplexity per context (with the base's), passkey, the verdict."""
    lines = []
    m, d = report["model"], report["data"]
    lines.append(f"model     {m['path']}  (hash {m['hash'][:12]}, context {m['context_length']}, "
                 f"original {m['original_context']}, rope {m['rope']['type']})")
    scored = d.get("protocol_note") or f"{d['documents']} documents x {d['doc_tokens']} tokens"
    lines.append(f"data      {', '.join(d['sources'])} [{d['split']}]: {scored} (fingerprint {d['fingerprint'][:12]})")
    base = report.get("baseline")
    base_by_ctx = {r["ctx"]: r["ppl"] for r in base["results"]} if base else {}
    if base:
        lines.append(f"baseline  {base['model']['path']}  (original context {base['original_context']})")
    lines.append("")
    header = f"{'ctx':>8}  {'stride':>6}  {'ppl':>10}  {'base ppl':>10}  {'tokens':>10}  {'docs':>5}  note"
    lines.append(header)
    lines.append("-" * len(header))
    for r in report["results"]:
        bp = base_by_ctx.get(r["ctx"])
        note = ", ".join(x for x in ("extrapolation" if r.get("extrapolation") else "",
                                      f"{r['short_documents']} shorter than the window (one window each)"
                                      if r.get("short_documents") else "",
                                      "cached" if r.get("cached") else "") if x)
        lines.append(f"{r['ctx']:>8}  {r['stride']:>6}  {_fmt(r['ppl']):>10}  {_fmt(bp) if bp is not None else '-':>10}"
                     f"  {r['tokens']:>10}  {r['documents']:>5}  {note}")
    for c, bp in sorted(base_by_ctx.items()):
        if c not in {r["ctx"] for r in report["results"]}:
            lines.append(f"{c:>8}  {'':>6}  {'-':>10}  {_fmt(bp):>10}")
    pk = report.get("passkey")
    if pk:
        lines.append("")
        lines.append(f"passkey   window {pk['window']}, {pk['trials']} trials per distance, mode {pk['mode']}: "
                     f"k_max {pk['k_max']}")
        items = list(pk["accuracy_by_distance"].items())
        for i in range(0, len(items), 8):
            lines.append("          " + "  ".join(f"{k}:{v:.2f}" for k, v in items[i:i + 8]))
    if report.get("tasks"):
        lines.append("")
        lines += format_tasks(report["tasks"], (report.get("baseline") or {}).get("tasks"))
    gate = report.get("gate")
    if gate:
        lines.append("")
        lines.append(f"gate      {'PASSED' if gate['passed'] else 'FAILED'}")
        for r in gate["reasons"]:
            lines.append(f"  - {r}")
    return "\n".join(lines)


def format_tasks(tasks: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> list[str]:
    """The task table: one row per task, one column per length, "score (base score)" where the
    base ran too; the mean and the effective lengths below."""
    lengths = [int(x) for x in tasks["lengths"]]
    width = 13 if base else 6

    def row(label: str, mine: Mapping[str, float], theirs: Mapping[str, float] | None) -> str:
        cells = []
        for L in lengths:
            v, b = mine.get(str(L)), (theirs or {}).get(str(L))
            cell = "-" if v is None else f"{v:.2f}"
            cells.append(f"{cell} ({b:.2f})" if b is not None else cell)
        return f"{label:<16}" + "".join(f"{c:>{width + 2}}" for c in cells)

    lines = [f"tasks     {tasks['samples']} samples per task and length; score = string-match recall"
             + ("; (base) where the base ran" if base else ""),
             f"{'task':<16}" + "".join(f"{L:>{width + 2}}" for L in lengths)]
    for name, entry in tasks["tasks"].items():
        lines.append(row(name, entry["scores"], ((base or {}).get("tasks") or {}).get(name, {}).get("scores")))
    lines.append(row("mean", tasks["average"], (base or {}).get("average")))
    eff = tasks["effective_length"]
    lines.append(f"effective length {eff if eff is not None else '-'} (mean >= {tasks['threshold']:g} at every "
                 f"length up to it)" + (f"; base {base['effective_length']}" if base else ""))
    lines += [f"  skipped: {s}" for s in tasks.get("skipped", [])]
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return "-"
    return f"{v:.4f}" if math.isfinite(v) and v < 1e5 else f"{v:.3g}"
