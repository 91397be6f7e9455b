"""Fault injection: every writer x every fault ends in one `error:` line, and nothing is ever lost.

Commands: calibrate, convert --to gguf, convert --to trtllm, import, eval, extend, push/pull, zoo.
Faults, each on a real file system or a real process:
- read-only output: a read-only bind mount of the output's folder (root only, else skipped);
- full disk: a small tmpfs mounted on the output's folder (root only, else skipped);
- SIGKILL and SIGINT at the N-th write: PIZOO_TEST_FAULT=kill:N / int:N (fsutil.install_fault_hook)
  sends the signal at the N-th file opened for writing or renamed;
- a Hub that accepts connections and never answers (a loopback socket in this test);
- a concurrent second writer: another process holds the output's lock, or two runs race.

Each scenario checks the exit code; that stderr is one `error:` line (progress bars aside) and holds
no traceback; that the output area holds exactly what it held before (or, after SIGINT of a
calibration, its resumable state); and that a rerun completes with outputs byte-identical to every
other scenario's rerun of the same command (timing fields aside). The scenarios run as parallel
subprocesses in one module fixture; each parametrised test checks one.
"""

from __future__ import annotations

import concurrent.futures as cf
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
# Fields whose values are wall-clock measurements: compared with them removed.
TIMED_KEYS = {"calibration.json": ("duration_s",), "metrics.jsonl": ("elapsed_s", "tokens_per_s")}


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


def run(args: list, env: dict, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(env)
    env.pop("PIZOO_TEST_FAULT", None)
    if fault:
        env["PIZOO_TEST_FAULT"] = fault
    return subprocess.run(PY + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


def _progress(line: str) -> bool:
    """Progress on stderr beside the error line: tqdm's bars, extend's "[i/n] stage: running"."""
    if re.match(r"\[\d+/\d+\] [a-z-]+: ", line):
        return True
    return "|" in line and ("it/s" in line or "B/s" in line or "step/s" in line or "%|" in line or "s/" in line)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of stderr; fails on a traceback or any other line."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and not _progress(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry below `folder` (hidden ones too): sha256 of files (timing fields removed), 'dir'."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir():
            out[rel] = "dir"
            continue
        data = p.read_bytes()
        keys = TIMED_KEYS.get(p.name)
        if keys and p.name.endswith(".jsonl"):
            rows = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
            data = json.dumps([{k: v for k, v in r.items() if k not in keys} for r in rows]).encode()
        elif keys:
            data = json.dumps({k: v for k, v in json.loads(data).items() if k not in keys}, sort_keys=True).encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def clear(folder: Path) -> None:
    for p in folder.iterdir():
        if p.name != "keep.txt":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@dataclass
class Outcome:
    """What one scenario saw: the failing run, the area before and after it, the rerun's output."""
    proc: subprocess.CompletedProcess
    before: dict
    after: dict
    rerun: subprocess.CompletedProcess | None = None
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
    raise AssertionError(name)


COMMANDS = ["calibrate", "gguf", "trtllm", "import", "eval"]
FINAL = {"calibrate": "out", "gguf": "out/m.gguf", "trtllm": "out", "import": "out", "eval": "out/eval.json"}
# The N-th write to stop at, per command: inside the work, after at least one temporary exists.
NTH_WRITE = {"calibrate": 6, "gguf": 1, "trtllm": 2, "import": 2, "eval": 1}
# A tmpfs too small for the output but big enough for the lock file.
DISK_SIZE = {"calibrate": "96k", "gguf": "64k", "trtllm": "64k", "import": "64k", "eval": "8k"}
FAULTS_OF = {"calibrate": FAULTS, "gguf": FAULTS, "trtllm": FAULTS, "import": FAULTS, "eval": ["read-only", "sigkill"]}


def scenario(name: str, fault: str, w: dict) -> Outcome:
    """Run `name` under `fault` in its own area, check nothing else, then rerun without the fault."""
    area = w["root"] / f"{name}-{fault}"
    area.mkdir()
    (area / "keep.txt").write_text("the user's file\n")
    out = area / "out"
    if name == "gguf":
        out.mkdir()  # the .gguf goes into an existing folder of the user's
    args = command_args(name, w, out)
    env = w["env"]
    t0 = time.perf_counter()
    before = snapshot(area)
    if fault == "read-only":
        with read_only(area):
            proc = run(args, env)
    elif fault == "disk-full":
        hold = w["root"] / f"{name}-{fault}.saved"
        shutil.copytree(area, hold)
        with full_disk(area, DISK_SIZE[name]):
            shutil.copytree(hold, area, dirs_exist_ok=True)
            before = snapshot(area)
            proc = run(args, env)
            after = snapshot(area)
        shutil.rmtree(hold)
    elif fault == "sigkill":
        proc = run(args, env, fault=f"kill:{NTH_WRITE[name]}")
    elif fault == "sigint":
        proc = run(args, env, fault=f"int:{NTH_WRITE[name]}")
    else:
        raise AssertionError(fault)
    if fault != "disk-full":
        after = snapshot(area)
    rerun = run(args, env)
    result = snapshot(area)
    return Outcome(proc, before, after, rerun, result, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_factory, text_file):
    root = tmp_path_factory.mktemp("faults")
    base = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    home = root / "home"
    env = dict(os.environ, PIZOO_HOME=str(home), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="0", PIZOO_HUB_TIMEOUT="1", PIZOO_HUB_RETRIES="2")
    gguf = root / "llama.gguf"
    proc = run(["convert", base, "--to", "gguf", "--dtype", "f32", "--out", gguf], env)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "base": base, "text": text_file, "env": env, "gguf": gguf, "home": home}


@pytest.fixture(scope="module")
def outcomes(work):
    """Every (command, fault) scenario, run in parallel subprocesses."""
    wanted = [(c, f) for c in COMMANDS for f in FAULTS_OF[c] if MOUNT_PROBLEM is None or f not in
              ("read-only", "disk-full")]
    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(scenario, *key, work) for key in wanted}
        return {key: fut.result() for key, fut in futures.items()}


CASES = [(c, f) for c in COMMANDS for f in FAULTS_OF[c]]
# Not yet run to completion on the loaded development machine it was written on: kept out of CI's
# default run until it has been (python3 -m pytest -m slow tests/test_faults.py).
UNVERIFIED = pytest.mark.slow



@UNVERIFIED
@pytest.mark.parametrize("command,fault", CASES, ids=[f"{c}-{f}" for c, f in CASES])
def test_fault_ends_in_one_line_and_loses_nothing(outcomes, command, fault):
    if fault in ("read-only", "disk-full") and MOUNT_PROBLEM:
        pytest.skip(MOUNT_PROBLEM)
    o = outcomes[(command, fault)]
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
        if fault == "sigint" and command == "calibrate":
            # Ctrl-C saves the training state to resume from: only that is new.
            new = {k for k in o.after if k not in o.before}
            assert new and all(k.startswith("out.calibrate-state") for k in new), sorted(new)
        else:
            assert o.after == o.before, (line, sorted(set(o.after) ^ set(o.before)))
    # The rerun completes, leaves no temporary, lock or state behind, and writes what every other
    # scenario of this command wrote.
    assert o.rerun.returncode == 0, o.rerun.stderr[-3000:]
    assert not [k for k in o.result if k.split("/")[-1].startswith(".") or "calibrate-state" in k], o.result
    others = [x.result for (c, f), x in outcomes.items() if c == command and x.rerun.returncode == 0]
    assert all(r == o.result for r in others), command


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
    """push and pull (and extend's push stage through the same code) stop after PIZOO_HUB_TIMEOUT=1 s
    x PIZOO_HUB_RETRIES=2 attempts with one line, and record nothing in the zoo."""
    env = dict(work["env"], HF_ENDPOINT=silent_hub, HF_TOKEN="hf_silent_test_token", PIZOO_HOME=str(tmp_path / "h"))
    jobs = {"push": ["push", work["base"], "alice/tiny", "--force"], "pull": ["pull", "alice/tiny"]}
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(2) as pool:
        procs = dict(zip(jobs, pool.map(lambda a: run(a, env, timeout=120), jobs.values())))
    elapsed = time.perf_counter() - t0
    for name, proc in procs.items():
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        line = error_line(proc)
        assert "no answer within 1 s, 2 attempts" in line and silent_hub in line, line
        assert "hf_silent_test_token" not in proc.stderr + proc.stdout
    assert elapsed < 60, elapsed  # bounded: a client with no timeout would wait forever
    assert not (tmp_path / "h" / "zoo.json").exists()


# ------------------------------------------------------------------------------------------------
# A concurrent second writer

HOLD_LOCK = """
import sys
from pizoo.fsutil import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@UNVERIFIED
def test_second_writer_is_refused_naming_the_holder(work, tmp_path):
    """While another process writes an output, every writer of it stops at once with one line that
    names the holder; the holder's output area is not touched."""
    jobs = {}
    for name in COMMANDS:
        area = tmp_path / name
        area.mkdir()
        out = area / "out"
        lock_target = out / "m.gguf" if name == "gguf" else out
        if name == "gguf":
            out.mkdir()
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_target)], env=work["env"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        jobs[name] = (holder, command_args(name, work, out), snapshot(area), area)
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            procs = dict(zip(jobs, pool.map(lambda j: run(j[1], work["env"]), jobs.values())))
        for name, proc in procs.items():
            holder, _, before, area = jobs[name]
            assert proc.returncode == 2, (name, proc.stderr[-2000:])
            line = error_line(proc)
            assert f"another pizoo process is writing it (pid {holder.pid}" in line, line
            assert snapshot(area) == before, name
    finally:
        for holder, *_ in jobs.values():
            holder.stdin.close()
            holder.wait()


@UNVERIFIED
def test_two_calibrations_of_one_output_race_and_one_wins(work, tmp_path):
    """The issue's race: two `pizoo calibrate` on the same --out. One writes it; the other stops with
    one line (the lock, or the finished output); metrics.jsonl has one line per step."""
    out = tmp_path / "out"
    args = command_args("calibrate", work, out)
    args[args.index("--steps") + 1] = 30
    args[args.index("--checkpoint-every") + 1] = 10
    with cf.ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: run(args, work["env"]), range(2)))
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [p.stderr[-2000:] for p in procs]
    loser = next(p for p in procs if p.returncode == 2)
    line = error_line(loser)
    assert "another pizoo process is writing it" in line or "already exists" in line, line
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 30


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


def invoke(*args, env: dict | None = None, cwd: Path | None = None):
    from typer.testing import CliRunner

    from pizoo.cli import app

    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args], env=env)
    finally:
        os.chdir(old)


def one_line(result, code: int = 2) -> str:
    """The single `error:` line of a failed in-process run."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not _progress(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


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
    assert invoke(*args).exit_code == 0
    first = snapshot(out)
    assert "already exists" in one_line(invoke(*args))
    r = invoke(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert snapshot(out) == first


def test_write_into_proc_is_one_line(work):
    line = one_line(invoke("convert", work["base"], "--to", "gguf", "--out", "/proc/x.gguf"))
    assert line.startswith("error: /proc/x.gguf: cannot write (no such file or directory); /proc does not accept"), line


def test_pizoo_home_that_is_a_file_is_one_line(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a folder\n")
    line = one_line(invoke("zoo", "alias", "mine", "org/model", env={"PIZOO_HOME": str(home)}))
    assert str(home) in line and "cannot write" in line, line
    assert home.read_text() == "not a folder\n"


@pytest.mark.skipif(MOUNT_PROBLEM is not None, reason=str(MOUNT_PROBLEM))
def test_read_only_pizoo_home_is_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with read_only(home):
        line = one_line(invoke("zoo", "alias", "mine", "org/model", env={"PIZOO_HOME": str(home)}))
    assert str(home) in line and "read-only file system" in line, line
    assert list(home.iterdir()) == []


def test_failed_calibrate_start_leaves_no_state(work, tiny_llama, tmp_path):
    (tiny_llama / "tokenizer.json").write_text("{ not json")
    out = tmp_path / "out"
    r = invoke(*command_args("calibrate", dict(work, base=tiny_llama), out))
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"], list(tmp_path.iterdir())


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
    line = one_line(invoke("extend", work["base"], "--ctx", 256, "--eval-ctx", "abc", "--out", tmp_path / "r"))
    assert line.startswith("error: --eval-ctx: 'abc' is not a number"), line
    line = one_line(invoke("extend", work["base"], "--ctx", 5_000_000_000, "--out", tmp_path / "r"))
    assert "--ctx 5000000000: above 2147483647" in line, line
    assert list(tmp_path.iterdir()) == []


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


@UNVERIFIED
def test_resume_with_a_relative_base_after_an_absolute_one(work, tmp_path):
    """Killed with the base given as an absolute path, resumed with the same base as a relative path:
    the same settings, so it resumes (and finishes)."""
    out = tmp_path / "out"
    args = command_args("calibrate", work, out)
    killed = run(args, work["env"], fault="kill:8")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rel = os.path.relpath(work["base"], tmp_path)
    args[args.index(work["base"])] = rel
    env = dict(work["env"], PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    resumed = subprocess.run(PY + [str(a) for a in args], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
