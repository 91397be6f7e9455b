"""Fault injection: every writer x every fault ends in one `error:` line, and nothing is ever lost.

Commands: calibrate, convert --to gguf, convert --to trtllm, import, eval, extend, push/pull, zoo.
Faults, each on a real file system or a real process:
- read-only output: a read-only bind mount of the output's folder (root only, else skipped);
- full disk: a small tmpfs mounted on the output's folder (root only, else skipped);
- SIGKILL and SIGINT at the N-th write: PIZOO_TEST_FAULT=kill:N / int:N (fsutil.install_fault_hook)
  sends the signal at the N-th file opened for writing or renamed;
- a Hub that accepts connections and never answers (a loopback socket in this test);
- a concurrent second writer: another process holds the output's lock, or two runs race.

Each scenario checks the exit code; that stderr is one `error:` line (progress aside) and holds no
traceback; that the output area holds exactly what it held before (or what the run keeps to resume
from: RESUMABLE); and that a rerun completes with outputs byte-identical to every other scenario's
rerun of the same command (timing fields and run logs aside). A command's scenarios run together on
first use (the `outcomes` fixture): SIGKILL in a subprocess, everything else in this process (typer's
runner; SIGINT is sent to this process), which saves a subprocess's imports; each parametrised test
checks one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PY = [sys.executable, "-m", "pizoo.cli"]
CTX = 256
# Fields that differ on every run (at any depth): compared with them removed. Wall-clock measurements,
# and eval.json's model hash: its fast mode covers the weights' modification time (eval/cache.py).
TIMED_KEYS = {"calibration.json": ("duration_s",), "metrics.jsonl": ("elapsed_s", "tokens_per_s"),
              "eval.json": ("seconds", "tokens_per_second", "hash")}
# A log of the run, not an output: extend's run.json records when each stage ran and which a rerun
# skipped, so only that it is there is compared.
RUN_LOGS = {"run.json"}


# ------------------------------------------------------------------------------------------------
# Mounts (root only)


def _mount_problem() -> str | None:
    """None when this process may mount (root with mount(8) allowed), else why not."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root and mount(8) for a read-only bind mount or a small tmpfs"
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"pizoo-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if r.returncode != 0:
            return f"mount is not permitted here: {r.stderr.decode().strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


MOUNT_PROBLEM = _mount_problem()


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` (and everything below it) read-only, as a remounted bind mount of itself."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@contextlib.contextmanager
def full_disk(folder: Path, size: str):
    """A fresh tmpfs of `size` on `folder`; its contents go when it is unmounted."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# ------------------------------------------------------------------------------------------------
# Running and checking


@dataclass
class Ran:
    """What one run of the CLI showed: its exit code and its stderr (a traceback included, if any)."""
    returncode: int
    stderr: str
    stdout: str = ""


def run(args: list, env: dict, fault: str | None = None, timeout: float = 300, cwd: Path | None = None) -> Ran:
    """The CLI in a subprocess: only for what needs one (SIGKILL at the N-th write)."""
    proc = subprocess.run(PY + [str(a) for a in args], env=fault_env(env, fault), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    return Ran(proc.returncode, proc.stderr, proc.stdout)


def fault_env(env: dict, fault: str | None) -> dict:
    env = dict(os.environ, **env)
    env.pop("PIZOO_TEST_FAULT", None)
    if fault:
        env["PIZOO_TEST_FAULT"] = fault
    return env


def invoke(*args, env: dict | None = None, cwd: Path | None = None) -> Ran:
    """The CLI in this process (typer's runner: the app's own entry, stderr and exit code captured):
    everything that needs no signal runs here, saving a subprocess's `import torch` (~10 s)."""
    import traceback

    from typer.testing import CliRunner

    from pizoo.cli import app

    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    finally:
        os.chdir(old)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
    return Ran(r.exit_code, stderr, r.stdout)


def _progress(line: str) -> bool:
    """Progress on stderr beside the error line: extend's plan (a "plan: " line, then indented rows),
    its "[i/n] stage: running", evaluation notes and results, the GGUF ladder's "gguf TYPE: FILE (size,
    time)"; tqdm's bars, with a total
    ("x:  50%|#####     | 2/4 [00:01<00:01, 2.0it/s]") or without ("writing: 0.00B [00:00, ?B/s]")."""
    if re.match(r"\[\d+/\d+\] [a-z-]+: |plan: .+ -> \d+ tokens$|\s{2,}\S|(note|data|ppl @ \d+|passkey @ \d+|task \S+ @ \d+): |gguf \S+: \S+\.gguf \(",
                line):
        return True
    # the rate: "2.0it/s", "?B/s", or its inverse "1.19s/step"
    return re.search(r"\[\d+:\d\d(<[^,\]]*)?, [^\]]*(/s\b|s/)", line) is not None and not line.startswith("error:")


def error_line(proc: Ran) -> str:
    """The one `error:` line of stderr; fails on a traceback or any other line."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and not _progress(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry below `folder` (hidden ones too): sha256 of files (timing fields removed), 'dir'.
    The folder's own path, which a written README may name, reads as `<area>`: scenarios in different
    folders compare equal when they wrote the same thing."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir():
            out[rel] = "dir"
            continue
        data = p.read_bytes().replace(str(folder).encode(), b"<area>")
        keys = TIMED_KEYS.get(p.name)
        if p.name in RUN_LOGS:
            data = b"a run log"
        elif keys and p.name.endswith(".jsonl"):
            rows = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
            data = json.dumps([untimed(r, keys) for r in rows], sort_keys=True).encode()
        elif keys:
            data = json.dumps(untimed(json.loads(data), keys), sort_keys=True).encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def untimed(value, keys: tuple):
    """`value` without the fields named in `keys`, at any depth."""
    if isinstance(value, dict):
        return {k: untimed(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [untimed(v, keys) for v in value]
    return value


@dataclass
class Outcome:
    """What one scenario saw: the failing run, the area before and after it, the rerun's output."""
    proc: Ran
    before: dict
    after: dict
    rerun: Ran | None = None
    result: dict = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# The commands under test: argv for an output `out` in area/; where the area's output lands.

FAULTS = ["read-only", "disk-full", "sigkill", "sigint"]


def command_args(name: str, w: dict, out: Path) -> list:
    if name == "calibrate":
        return ["calibrate", w["base"], "--ctx", CTX, "--recipe", "pi", "--data", w["text"], "--steps", 4,
                "--train-len", 64, "--global-batch", 2, "--checkpoint-every", 1, "--lr", "1e-3", "--device", "cpu",
                "--out", out]
    if name == "gguf":
        return ["convert", w["base"], "--to", "gguf", "--dtype", "f32", "--out", out / "m.gguf"]
    if name == "trtllm":
        return ["convert", w["base"], "--to", "trtllm", "--dtype", "float32", "--out", out]
    if name == "import":
        return ["import", w["gguf"], "--out", out]
    if name == "eval":
        return ["eval", w["base"], "--ctx", 64, "--no-passkey", "--no-baseline", "--no-gate", "--max-docs", 1,
                "--data", w["text"], "--device", "cpu", "--no-cache", "--out", out]
    if name == "extend":  # every format: the full disk strikes in the TensorRT-LLM stage, as in the issue
        return ["extend", w["base"], "--ctx", CTX, "--steps", 1, "--global-batch", 2, "--train-len", 64,
                "--formats", "hf,gguf,trtllm", "--gguf-dtype", "f32", "--eval", "quick", "--eval-ctx", CTX,
                "--data", w["text"], "--out", out]
    raise AssertionError(name)


COMMANDS = ["calibrate", "gguf", "trtllm", "import", "eval", "extend"]
# What a killed run must not leave behind half-written (extend: the stage it was killed in).
FINAL = {"calibrate": "out", "gguf": "out/m.gguf", "trtllm": "out", "import": "out", "eval": "out/eval.json",
         "extend": "out/hf"}
# The N-th write to stop at, per command: inside the work, after at least one temporary exists
# (extend: 12 writes of run.json and a tokenizer temporary, then calibrate's metrics and the
# calibrated weights' temporary folder; before the evaluation, whose cache makes later counts vary).
NTH_WRITE = {"calibrate": 6, "gguf": 1, "trtllm": 2, "import": 2, "eval": 1, "extend": 16}
# A tmpfs too small for the output but big enough for the lock file (extend: for the HF, eval and
# GGUF stages, not for the TensorRT-LLM checkpoint after them).
DISK_SIZE = {"calibrate": "96k", "gguf": "64k", "trtllm": "64k", "import": "64k", "eval": "8k", "extend": "1400k"}
FAULTS_OF = dict.fromkeys(COMMANDS, FAULTS)
# Faults after which a command keeps what it finished, to resume from: only this may be new. Ctrl-C
# saves a calibration's state; extend keeps its release folder (run.json, the finished stages).
RESUMABLE = {("calibrate", "sigint"): "out.calibrate-state", ("extend", "sigint"): "out",
             ("extend", "disk-full"): "out"}


def prepare(name: str, fault: str, w: dict) -> tuple[Path, list]:
    """The scenario's own area, holding a file of the user's (and, for gguf, the folder it writes into)."""
    area = w["root"] / f"{name}-{fault}"
    area.mkdir()
    (area / "keep.txt").write_text("the user's file\n")
    out = area / "out"
    if name == "gguf":
        out.mkdir()  # the .gguf goes into an existing folder of the user's
    return area, command_args(name, w, out)


def in_process_fault(name: str, fault: str, w: dict, area: Path, args: list) -> tuple[Ran, dict, dict]:
    """A read-only or full file system under the area, or SIGINT at the N-th write (Ctrl-C: a real
    signal to this process, raising KeyboardInterrupt where the command is); the command runs in this
    process."""
    if fault == "sigint":
        from pizoo.fsutil import install_fault_hook

        before = snapshot(area)
        # Python's own Ctrl-C handler, whatever the test runner set (xdist workers may ignore SIGINT).
        handler = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            install_fault_hook(f"int:{NTH_WRITE[name]}")
            ran = invoke(*args, env=w["cli_env"])
        finally:
            signal.signal(signal.SIGINT, handler)
        return ran, before, snapshot(area)
    if fault == "read-only":
        before = snapshot(area)
        with read_only(area):
            ran = invoke(*args, env=w["cli_env"])
        return ran, before, snapshot(area)
    hold = w["root"] / f"{name}-{fault}.saved"
    shutil.copytree(area, hold)
    with full_disk(area, DISK_SIZE[name]):
        shutil.copytree(hold, area, dirs_exist_ok=True)
        before = snapshot(area)
        ran = invoke(*args, env=w["cli_env"])
        after = snapshot(area)
    shutil.rmtree(hold)  # the area under the unmounted tmpfs is as it was before
    return ran, before, after


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_factory, text_file):
    root = tmp_path_factory.mktemp("faults")
    base = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    home = root / "home"
    cli_env = {"PIZOO_HOME": str(home), "PIZOO_HUB_TIMEOUT": "1", "PIZOO_HUB_RETRIES": "2"}
    env = dict(cli_env, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    gguf = root / "llama.gguf"
    ran = invoke("convert", base, "--to", "gguf", "--dtype", "f32", "--out", gguf, env=cli_env)
    assert ran.returncode == 0, ran.stderr
    return {"root": root, "base": base, "text": text_file, "env": env, "cli_env": cli_env, "gguf": gguf,
            "home": home}


SIGNAL_FAULTS = ("sigkill", "sigint")
SUBPROCESS_FAULTS = ("sigkill",)  # the process dies: it cannot be this one


@pytest.fixture(scope="module")
def outcomes(work):
    """outcomes(command) -> {fault: Outcome}: every fault scenario of one command, run on first use
    (so `-k gguf` runs only gguf's). SIGKILL runs as a subprocess; meanwhile the other faults run in
    this process; then every rerun runs here."""
    done: dict[str, dict[str, Outcome]] = {}

    def of(command: str) -> dict[str, Outcome]:
        if command not in done:
            done[command] = run_scenarios(command, work)
        return done[command]

    return of


def run_scenarios(name: str, work: dict) -> dict[str, Outcome]:
    faults = [f for f in FAULTS_OF[name] if MOUNT_PROBLEM is None or f in SIGNAL_FAULTS]
    setups = {fault: prepare(name, fault, work) for fault in faults}
    started, found = {}, {}
    for fault, (area, args) in setups.items():
        if fault in SUBPROCESS_FAULTS:
            before = snapshot(area)
            proc = subprocess.Popen(PY + [str(a) for a in args], env=fault_env(work["env"], f"kill:{NTH_WRITE[name]}"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            started[fault] = (proc, before, time.perf_counter())
    for fault, (area, args) in setups.items():
        if fault not in SUBPROCESS_FAULTS:
            t0 = time.perf_counter()
            ran, before, after = in_process_fault(name, fault, work, area, args)
            found[fault] = Outcome(ran, before, after, seconds=time.perf_counter() - t0)
    for fault, (proc, before, t0) in started.items():
        stdout, stderr = proc.communicate(timeout=600)
        found[fault] = Outcome(Ran(proc.returncode, stderr, stdout), before, snapshot(setups[fault][0]),
                               seconds=time.perf_counter() - t0)
    for fault, o in found.items():
        area, args = setups[fault]
        o.rerun = invoke(*args, env=work["cli_env"])
        o.result = snapshot(area)
    return found


CASES = [(c, f) for c in COMMANDS for f in FAULTS_OF[c]]


@pytest.mark.parametrize("command,fault", CASES, ids=[f"{c}-{f}" for c, f in CASES])
def test_fault_ends_in_one_line_and_loses_nothing(outcomes, command, fault):
    if fault not in SIGNAL_FAULTS and MOUNT_PROBLEM:
        pytest.skip(MOUNT_PROBLEM)
    runs = outcomes(command)
    o = runs[fault]
    if fault == "sigkill":
        assert o.proc.returncode == -signal.SIGKILL, o.proc.stderr[-3000:]
        # What a kill leaves (a temporary, a checkpoint) is pizoo's own and swept by the rerun; the
        # output itself never appears half-written, and the user's file is untouched.
        assert o.after["keep.txt"] == o.before["keep.txt"]
        assert FINAL[command] not in o.after, sorted(o.after)
    else:
        code = 130 if fault == "sigint" else 2
        assert o.proc.returncode == code, o.proc.stderr[-3000:]
        line = error_line(o.proc)
        expected = {"read-only": "read-only file system", "disk-full": "no space left on device",
                    "sigint": "interrupted"}[fault]
        assert expected in line.lower(), line
        keep = RESUMABLE.get((command, fault))
        if keep:  # what it finished, to resume from, is new, and nothing else: no temporary
            new = {k for k in o.after if k not in o.before}
            assert new and all(k.split("/")[0] == keep and not k.split("/")[-1].startswith(".") for k in new), \
                sorted(new)
            assert {k: v for k, v in o.after.items() if k in o.before} == o.before
        else:
            assert o.after == o.before, (line, sorted(set(o.after) ^ set(o.before)))
    # The rerun completes, leaves no temporary, lock or state behind, and writes what every other
    # scenario of this command wrote.
    assert o.rerun.returncode == 0, o.rerun.stderr[-3000:]
    assert not [k for k in o.result if k.split("/")[-1].startswith(".") or "calibrate-state" in k], o.result
    differ = {f: sorted(k for k in set(x.result) | set(o.result) if x.result.get(k) != o.result.get(k))
              for f, x in runs.items() if x.rerun.returncode == 0}
    assert not any(differ.values()), (command, fault, differ)


# ------------------------------------------------------------------------------------------------
# A Hub that accepts connections and never answers


@pytest.fixture(scope="module")
def silent_hub():
    """A loopback server that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(socket.timeout, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_hub_that_never_answers_gives_one_line_within_the_bound(work, silent_hub, tmp_path):
    """push, pull (and so extend's push stage and a Hub id as the model) and a Hub dataset as --data stop
    after PIZOO_HUB_TIMEOUT=0.5 s x PIZOO_HUB_RETRIES=2 attempts with one line, and record or write nothing."""
    env = dict(work["cli_env"], HF_ENDPOINT=silent_hub, HF_TOKEN="hf_silent_test_token", HF_HUB_OFFLINE="0",
               PIZOO_HOME=str(tmp_path / "h"), PIZOO_HUB_TIMEOUT="0.5")
    calibrate = command_args("calibrate", dict(work, text="alice/prose"), tmp_path / "out")
    for args in (["push", work["base"], "alice/tiny", "--force"], ["pull", "alice/tiny"], calibrate):
        t0 = time.perf_counter()
        ran = invoke(*args, env=env)
        elapsed = time.perf_counter() - t0
        line = one_line(ran)
        assert "no answer within 0.5 s, 2 attempts" in line and silent_hub in line, line
        assert "hf_silent_test_token" not in ran.stderr + ran.stdout
        # bounded: 2 attempts of 0.5 s and a 1 s pause (a client with no timeout would wait forever)
        assert elapsed < 30, (args[0], elapsed)
    assert not (tmp_path / "h" / "zoo.json").exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# A concurrent second writer


def test_second_writer_is_refused_naming_the_holder(work, tmp_path):
    """While another writer holds an output (its lock), every writer of it stops at once with one
    line that names the holder; the output area is not touched."""
    from pizoo.fsutil import output_lock

    for name in COMMANDS:
        area = tmp_path / name
        area.mkdir()
        out = area / "out"
        if name == "gguf":
            out.mkdir()
        target = out / "m.gguf" if name == "gguf" else out
        with output_lock(target):  # an flock: a second open file description is refused, as another process is
            before = snapshot(area)
            ran = invoke(*command_args(name, work, out), env=work["cli_env"])
            assert ran.returncode == 2, (name, ran.stderr[-2000:])
            line = error_line(ran)
            assert f"another pizoo process is writing it (pid {os.getpid()}" in line, line
            assert snapshot(area) == before, name


def test_two_calibrations_of_one_output_race_and_one_wins(work, tmp_path):
    """The issue's race: two `pizoo calibrate` on the same --out. While the first runs (a process of its
    own), the second stops with one line; the first completes with one metrics line per step."""
    out = tmp_path / "out"
    args = command_args("calibrate", work, out)
    args[args.index("--steps") + 1] = 30
    args[args.index("--checkpoint-every") + 1] = 10
    first = subprocess.Popen(PY + [str(a) for a in args], env=fault_env(work["env"], None), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".out.lock"
    deadline = time.monotonic() + 300
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = invoke(*args, env=work["cli_env"])
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    line = error_line(second)
    assert second.returncode == 2 and f"another pizoo process is writing it (pid {first.pid}" in line, line
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 30
    assert not lock.exists()


def test_zoo_writers_wait_for_each_other(tmp_path):
    """PIZOO_HOME's index: a second writer waits for the first (a short update) instead of failing."""
    from pizoo.fsutil import hold_lock
    from pizoo.zoo import Zoo

    zoo = Zoo(tmp_path / "home")
    zoo.add_alias("first", "org/first")
    released = threading.Event()

    def hold() -> None:
        with hold_lock(zoo.lock_path, zoo.index_path):
            time.sleep(0.5)
            released.set()

    thread = threading.Thread(target=hold)
    thread.start()
    time.sleep(0.1)
    zoo.add_alias("second", "org/second")
    assert released.is_set()  # it waited for the holder
    thread.join()
    names = set(json.loads(zoo.index_path.read_text())["aliases"])
    assert names == {"first", "second"}
    assert not zoo.lock_path.exists()


# ------------------------------------------------------------------------------------------------
# The examples, each a case (in process: no fault needs a second process)


def one_line(ran: Ran, code: int = 2) -> str:
    """The single `error:` line of a failed run (and its exit code)."""
    assert ran.returncode == code, (ran.returncode, ran.stderr[-3000:])
    return error_line(ran)


def user_folder(path: Path) -> dict:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "config.json").write_text('{"mine": true}\n')  # even an HF-looking folder of the user's
    return snapshot(path)


@pytest.mark.parametrize("command", ["calibrate", "trtllm", "import", "gguf"])
def test_overwrite_never_replaces_a_folder_pizoo_did_not_write(work, tmp_path, command):
    out = tmp_path / "my-folder"
    before = user_folder(out)
    args = command_args(command, work, out)
    if command == "gguf":  # a file of the user's at the output path
        args[-1] = out / "notes.txt"
    line = one_line(invoke(*args, "--overwrite", env={"PIZOO_HOME": str(work["home"])}))
    assert "was not written by pizoo" in line and "--overwrite will not replace it" in line, line
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["ppl.png", "eval.json"])
def test_eval_never_replaces_a_report_file_pizoo_did_not_write(work, tmp_path, name):
    out = tmp_path / "my-folder"
    user_folder(out)
    (out / name).write_text('{"mine": true}\n')  # JSON: a report-shaped file, but not pizoo's
    before = snapshot(out)
    line = one_line(invoke(*command_args("eval", work, out), env=work["cli_env"]))
    assert f"--out {out}: holds {name} that pizoo did not write" in line, line
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["calibrate", "trtllm"])
def test_out_equal_to_the_base_is_refused_even_with_overwrite(work, tmp_path, command):
    base = tmp_path / "base"
    shutil.copytree(work["base"], base)
    before = snapshot(base)
    args = command_args(command, dict(work, base=base), base)
    line = one_line(invoke(*args, "--overwrite"))
    assert "is the input" in line and str(base) in line, line
    assert snapshot(base) == before


def test_overwrite_replaces_what_pizoo_wrote(work, tmp_path):
    out = tmp_path / "trt"
    args = command_args("trtllm", work, out)
    assert invoke(*args).returncode == 0
    first = snapshot(out)
    assert "already exists" in one_line(invoke(*args))
    r = invoke(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert snapshot(out) == first


def test_write_into_proc_is_one_line(work):
    line = one_line(invoke("convert", work["base"], "--to", "gguf", "--out", "/proc/x.gguf"))
    assert line.startswith("error: /proc/x.gguf: cannot write (no such file or directory); /proc does not accept"), line


def test_pizoo_home_that_is_a_file_is_one_line(work, tmp_path):
    home = tmp_path / "home"
    home.write_text("not a folder\n")
    line = one_line(invoke("zoo", "alias", "mine", "org/model", env={"PIZOO_HOME": str(home)}))
    assert str(home) in line and "cannot write" in line, line
    line = one_line(invoke(*command_args("extend", work, tmp_path / "release"), env={"PIZOO_HOME": str(home)}))
    assert str(home) in line and "cannot write (not a directory)" in line, line
    assert home.read_text() == "not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@pytest.mark.skipif(MOUNT_PROBLEM is not None, reason=str(MOUNT_PROBLEM))
def test_read_only_pizoo_home(work, tmp_path):
    """A zoo write fails in one line, and extend (whose last stage registers) refuses before any work;
    eval, for which PIZOO_HOME is only a cache, completes without caching."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"PIZOO_HOME": str(home)}
    with read_only(home):
        line = one_line(invoke("zoo", "alias", "mine", "org/model", env=env))
        assert str(home) in line and "read-only file system" in line, line
        line = one_line(invoke(*command_args("extend", work, tmp_path / "release"), env=env))
        assert str(home) in line and "read-only file system" in line, line
        ran = invoke(*[a for a in command_args("eval", work, tmp_path / "eval") if a != "--no-cache"], env=env)
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert f"note: results not cached: {home / 'eval-cache'}" in ran.stderr, ran.stderr[-2000:]
    assert list(home.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "home"]
    assert (tmp_path / "eval" / "eval.json").is_file()


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_failed_calibrate_start_leaves_no_state(work, tiny_llama, tmp_path, damage):
    tokenizer = tiny_llama / "tokenizer.json"
    if damage == "corrupt":
        tokenizer.write_text("{ not json")
    else:
        tokenizer.unlink()
    line = one_line(invoke(*command_args("calibrate", dict(work, base=tiny_llama), tmp_path / "out")))
    assert "tokenizer" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"], list(tmp_path.iterdir())


def test_extend_refuses_a_foreign_out_before_showing_its_plan(work, tmp_path):
    """The --out check comes before the plan: stderr is the one line, not a plan and then the line."""
    out = tmp_path / "my-folder"
    before = user_folder(out)
    line = one_line(invoke(*command_args("extend", work, out), env=work["cli_env"]))
    assert f"--out {out}: exists and is not a pizoo extend folder" in line, line
    assert snapshot(out) == before


@pytest.mark.parametrize("variant,recipe,formats,expected", [
    ("llama", "dynamic-ntk", "hf,gguf", "--recipe dynamic-ntk with --formats gguf: dynamic NTK scaling has no GGUF form"),
    ("qwen3", "llama3", "hf,gguf", "--recipe llama3 with --formats gguf: 'llama3' scaling needs per-frequency factors "
                                   "(a rope_freqs tensor), which llama.cpp's qwen3"),
    ("llama", "clex", "hf,trtllm", "--recipe clex with --formats trtllm: CLEX frequencies (baked as longrope factors) "
                                   "have no faithful TensorRT-LLM form"),
    ("llama", "pi", "hf,trtllm --tp 8", "--formats trtllm: num_attention_heads 4 is not divisible by --tp 8"),
])
def test_extend_refuses_a_format_it_cannot_write_before_any_work(work, tiny_model_factory, tmp_path, variant, recipe,
                                                                 formats, expected):
    """The exporters' own refusals (a scaling with no GGUF or TensorRT-LLM form, a --tp the heads do not
    shard over) come before calibrating, not in the export stage after it."""
    base = tiny_model_factory(variant, variant=variant, tokenizer="bpe" if variant != "llama" else "sentencepiece")
    args = command_args("extend", dict(work, base=base), tmp_path / "release")
    line = one_line(invoke(*args, "--recipe", recipe, "--formats", *formats.split(), env=work["cli_env"]))
    assert line.startswith(f"error: {expected}"), line
    assert list(tmp_path.iterdir()) == []


def test_default_formats_leave_out_what_the_recipe_cannot_be_written_as(work):
    from pizoo.config import ModelConfig
    from pizoo.pipeline import settle_formats
    from pizoo.recipes import load_recipe

    cfg = ModelConfig.from_file(work["base"] / "config.json")
    assert settle_formats(cfg, None, load_recipe("pi"), CTX) == ("hf", "gguf", "trtllm")
    assert settle_formats(cfg, None, load_recipe("dynamic-ntk"), CTX) == ("hf", "trtllm")
    assert settle_formats(cfg, None, load_recipe("clex"), CTX) == ("hf", "gguf")


def test_extend_on_a_model_that_does_not_resolve_creates_no_folder(tmp_path):
    out = tmp_path / "release"
    line = one_line(invoke("extend", "./no-such-model", "--ctx", 256, "--out", out, cwd=tmp_path,
                           env={"PIZOO_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}))
    assert "cannot resolve model './no-such-model'" in line, line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,expected", [
    (["--device", "tpu"], "--device tpu: unknown device; use cpu or cuda"),
    (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
    (["--ctx", "5000000000"], "--ctx 5000000000: above 2147483647"),
])
def test_calibrate_options_are_checked_where_they_are_read(work, tmp_path, args, expected):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    full = command_args("calibrate", work, tmp_path / "out")
    for i in range(0, len(args), 2):
        full[full.index(args[i]) + 1] = args[i + 1]
    assert expected in one_line(invoke(*full))
    assert list(tmp_path.iterdir()) == []


def test_eval_device_tpu_and_extend_options(work, tmp_path):
    assert "--device tpu: unknown device" in one_line(invoke("eval", work["base"], "--device", "tpu", "--out",
                                                             tmp_path / "e"))
    assert "--batch-tokens 0: must be at least 1" in one_line(invoke("eval", work["base"], "--batch-tokens", 0,
                                                                     "--out", tmp_path / "e"))
    line = one_line(invoke("extend", work["base"], "--ctx", 256, "--eval-ctx", "abc", "--out", tmp_path / "r"))
    assert line.startswith("error: --eval-ctx: 'abc' is not a number"), line
    line = one_line(invoke("extend", work["base"], "--ctx", 5_000_000_000, "--out", tmp_path / "r"))
    assert "--ctx 5000000000: above 2147483647" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,expected", [
    (["calibrate", "BASE", "--ctx", "abc"], "error: Invalid value for '--ctx': Input should be a valid integer"),
    (["eval", "BASE", "--bogus"], "error: No such option: --bogus"),
    (["convert", "--to", "gguf"], "error: Missing argument 'model'"),
    (["zoo", "nothing"], "error: No such command 'nothing'"),
])
def test_usage_errors_are_one_line_too(work, args, expected):
    """What the argument parser refuses (a value of the wrong type, an unknown option, a missing
    argument) ends like every other bad input, with where help is."""
    line = one_line(invoke(*[work["base"] if a == "BASE" else a for a in args]))
    assert line.startswith(expected) and line.endswith("--help`"), line


@pytest.mark.parametrize("args,expected", [
    (["--architecture", "gptneox"], "--architecture gptneox: not an architecture pizoo knows"),
    (["--context", "-1"], "--context -1: must be a positive number of tokens"),
])
def test_zoo_alias_refuses_impossible_facts(tmp_path, args, expected):
    home = tmp_path / "home"
    assert expected in one_line(invoke("zoo", "alias", "mine", "org/model", *args, env={"PIZOO_HOME": str(home)}))
    assert not (home / "zoo.json").exists()


def test_binary_bytes_in_a_txt_are_refused(work, tmp_path):
    data = tmp_path / "random.txt"
    data.write_bytes(bytes(range(256)) * 64)
    args = command_args("calibrate", dict(work, text=data), tmp_path / "out")
    line = one_line(invoke(*args))
    assert line.startswith(f"error: {data}: not a text file"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random.txt"]


def test_relative_path_to_an_empty_folder_is_never_a_hub_id(silent_hub, tmp_path):
    (tmp_path / "cases" / "empty").mkdir(parents=True)
    env = {"PIZOO_HOME": str(tmp_path / "home"), "HF_ENDPOINT": silent_hub, "HF_HUB_OFFLINE": "0"}
    t0 = time.perf_counter()
    line = one_line(invoke("convert", "cases/empty", "--to", "gguf", cwd=tmp_path, env=env))
    assert line == ("error: cases/empty: a folder without config.json, so not an HF model folder; give a model "
                    "folder, a .gguf file, a zoo name, or a Hub id that is not also the path of a local folder"), line
    assert time.perf_counter() - t0 < 5  # the silent Hub was never asked


def test_resume_with_a_relative_base_after_an_absolute_one(work, tmp_path):
    """Killed with the base given as an absolute path, resumed with the same base as a relative path:
    the same settings, so it resumes (and finishes)."""
    out = tmp_path / "out"
    args = command_args("calibrate", work, out)
    # The 10th write opens metrics.jsonl for step 2: step 1's checkpoint is complete (writes 1-9 are a
    # tokenizer temporary, step 1's metrics, and the checkpoint's files and renames).
    killed = run(args, work["env"], fault="kill:10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = tmp_path / "out.calibrate-state"
    assert (state / "step-0000001").is_dir(), sorted(p.name for p in tmp_path.rglob("*"))
    args[args.index(work["base"])] = os.path.relpath(work["base"], tmp_path)
    resumed = invoke(*args, env=work["cli_env"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "(step 1)" in resumed.stderr, resumed.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
