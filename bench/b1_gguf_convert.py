"""B1: Hugging Face safetensors -> GGUF, pizoo vs llama.cpp's own convert_hf_to_gguf.py.

    python bench/b1_gguf_convert.py [--rounds 3] [--dtypes f16,q8_0]

What it does, all under the git-ignored bench/work/:
1. Writes a synthetic ~1.1B-parameter Llama (TinyLlama's shape, 22 layers) in bf16 safetensors
   shards with pizoo.synthetic.write_synthetic_llama, once.
2. Fetches llama.cpp's converter as vendored in the llama-cpp-python sdist (`pip download`), extracts
   only the converter, its `conversion` package, its gguf-py and its requirements, and installs those
   requirements into a venv whose path ends with this interpreter's site-packages (a .pth file), so
   torch is taken from wherever the benchmark runs, a virtualenv or a system install (the pinned
   CPU wheel lives on an index this machine cannot reach). The converter runs unmodified,
   with its own gguf-py on PYTHONPATH. None of it is part of pizoo.
3. Reads the input shards once so they sit in the page cache for every run.
4. For each output type, alternates llama.cpp, pizoo (`python -m pizoo.cli convert`) and the copy
   floors round by round. Every run is a fresh child process; wall time is measured around it, peak
   RSS comes from the OS. Before each run the previous output is deleted and dirty pages are synced,
   so no run pays for another's writes.
5. Compares the last pizoo and llama.cpp outputs tensor by tensor with gguf.GGUFReader (names, order,
   types, shapes, bytes) and lists metadata keys that differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (SYNTHETIC_1B_LAYERS, WORK_DIR, Run, alternate, flush_dirty_pages, machine_info, medians, ratio,
                    read_through, remove, reproduce_command, run_measured, synthetic_1b_checkpoint, table, target,
                    versions, write_result)

SDIST_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{SDIST_VERSION}"
VENDOR = f"{SDIST_NAME}/vendor/llama.cpp"
# What the converter imports or declares; nothing else is extracted.
VENDOR_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "requirements/", "requirements.txt")
SUBMODULE_HEAD = f"{SDIST_NAME}/.git/modules/vendor/llama.cpp/HEAD"
CONVERTER_REQUIREMENTS = "requirements/requirements-convert_hf_to_gguf.txt"
# Requirements left to the host interpreter: torch's pinned CPU wheel needs an index that is not PyPI.
HOST_PROVIDED = ("torch",)


# --- inputs -----------------------------------------------------------------------------------

def llama_cpp_sources(work: Path) -> Path:
    """llama.cpp's converter as vendored in the llama-cpp-python sdist; returns its folder."""
    root = work / "llama.cpp-converter"
    vendor = root / VENDOR
    if (vendor / "convert_hf_to_gguf.py").is_file():
        return vendor
    sdist_dir = work / "sdist"
    archive = sdist_dir / f"{SDIST_NAME}.tar.gz"
    if not archive.is_file():
        print(f"downloading the llama-cpp-python {SDIST_VERSION} sdist", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={SDIST_VERSION}", "-d", str(sdist_dir)], check=True)
    wanted = tuple(f"{VENDOR}/{m}" for m in VENDOR_MEMBERS) + (SUBMODULE_HEAD,)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(root, members=members, filter="data")
    return vendor


def requirement_lines(path: Path) -> list[str]:
    """A requirements file's package specifiers, following `-r` includes, without pip options."""
    out: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            out += requirement_lines(path.parent / line[3:].strip())
        elif not line.startswith("-"):
            out.append(line)
    return out


def host_site_packages() -> list[str]:
    """The site-packages folders of the interpreter running the benchmark: a virtualenv's own when it
    runs in one (where torch was installed), the system's otherwise."""
    import site
    import sysconfig

    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def converter_python(work: Path, vendor: Path) -> Path:
    """A venv holding the converter's own pinned requirements, with the host's packages (torch) after them.

    The venv is not made with system_site_packages: from inside a virtualenv that would expose the
    *base* interpreter's packages, which lack the virtualenv's torch. Instead a .pth file appends the
    running interpreter's site-packages to the venv's path, so the venv's own pins come first and
    torch comes from wherever the benchmark runs (virtualenv or system install)."""
    env_dir = work / "b1" / "converter-venv"
    python = env_dir / "bin" / "python"
    marker = env_dir / "requirements.installed"
    reqs = [r for r in requirement_lines(vendor / CONVERTER_REQUIREMENTS)
            if not r.lower().startswith(HOST_PROVIDED)]
    host = "\n".join(host_site_packages())
    state = "\n".join(reqs) + "\n--host--\n" + host
    if marker.is_file() and marker.read_text() == state and python.exists():
        return python
    print(f"installing the converter's requirements into {env_dir}: {reqs}", flush=True)
    if env_dir.exists():
        shutil.rmtree(env_dir)  # made for another host interpreter (or by an older B1): start clean
    venv.EnvBuilder(system_site_packages=False, with_pip=True).create(env_dir)
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    own = Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip())
    (own / "zz-pizoo-bench-host.pth").write_text(host + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", *reqs], check=True)
    subprocess.run([str(python), "-c", "import torch"], check=True)  # fail here, not in the first timed run
    marker.write_text(state)
    return python


def converter_versions(python: Path, vendor: Path, work: Path) -> dict[str, str]:
    code = ("import json, importlib; print(json.dumps({p: importlib.import_module(p).__version__ for p in "
            "('transformers', 'numpy', 'torch', 'sentencepiece', 'google.protobuf')}))")
    pkgs = json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)
    head = work / "llama.cpp-converter" / SUBMODULE_HEAD
    gguf_py = next((ln.split('"')[1] for ln in (vendor / "gguf-py" / "pyproject.toml").read_text().splitlines()
                    if ln.startswith("version")), "?")
    return {"llama.cpp_commit": head.read_text().strip() if head.is_file() else "?",
            "llama.cpp_gguf_py": gguf_py, **{f"converter_{k}": v for k, v in pkgs.items()}}


# --- the measured commands --------------------------------------------------------------------

def shard_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def make_variants(model: Path, dtype: str, out_dir: Path, py_llama: Path, vendor: Path,
                  logs: Path) -> tuple[dict, dict[str, Path]]:
    """label -> function(round) -> Run, and label -> its output file."""
    outputs = {"llama.cpp": out_dir / f"llama.cpp-{dtype}.gguf", "pizoo": out_dir / f"pizoo-{dtype}.gguf",
               "copy (cat)": out_dir / "copy.bin", "copy + fsync (dd)": out_dir / "copy-fsync.bin"}
    shards = [str(p) for p in shard_files(model)]
    llama_env = {"PYTHONPATH": str(vendor / "gguf-py")}
    commands = {
        "llama.cpp": [str(py_llama), str(vendor / "convert_hf_to_gguf.py"), str(model), "--outfile",
                      str(outputs["llama.cpp"]), "--outtype", dtype],
        "pizoo": [sys.executable, "-m", "pizoo.cli", "convert", str(model), "--to", "gguf", "--dtype", dtype,
                  "--out", str(outputs["pizoo"])],
        # The floor: the same input bytes read and written once, by the simplest tools there are.
        "copy (cat)": ["cat", *shards],
        "copy + fsync (dd)": ["sh", "-c", 'cat "$@" | dd of="$0" bs=16M conv=fsync status=none',
                              str(outputs["copy + fsync (dd)"]), *shards],
    }

    def runner(label: str):
        def run(round_: int) -> Run:
            remove(outputs[label])
            flush_dirty_pages()
            stdout = outputs[label] if label == "copy (cat)" else None
            env = llama_env if label == "llama.cpp" else None
            slug = "".join(c if c.isalnum() else "_" for c in label)
            return run_measured(commands[label], label=label, round_=round_, env=env, stdout_path=stdout,
                                log_path=logs / f"{dtype}-{slug}-{round_}.log")
        return run

    return {label: runner(label) for label in commands}, outputs


# --- comparing the two GGUF files -------------------------------------------------------------

def field_value(field):
    """A GGUF metadata value as plain Python (strings decoded, arrays as lists)."""
    try:
        return field.contents()
    except Exception:  # older gguf-py without ReaderField.contents
        return [bytes(field.parts[i]).hex() for i in field.data]


def compare_ggufs(a_path: Path, b_path: Path) -> dict:
    """Tensor-by-tensor comparison (names, order, types, shapes, bytes) and the metadata keys that
    differ. `a` is pizoo's file, `b` llama.cpp's."""
    import numpy as np
    from gguf import GGUFReader

    a, b = GGUFReader(a_path), GGUFReader(b_path)
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    mismatches = []
    for name in ta.keys() & tb.keys():
        x, y = ta[name], tb[name]
        problems = []
        if x.tensor_type != y.tensor_type:
            problems.append(f"type {x.tensor_type.name} vs {y.tensor_type.name}")
        if list(x.shape) != list(y.shape):
            problems.append(f"shape {list(x.shape)} vs {list(y.shape)}")
        if not problems and not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            diff = np.count_nonzero(np.asarray(x.data).view(np.uint8) != np.asarray(y.data).view(np.uint8))
            problems.append(f"data differs in {diff} of {x.n_bytes} bytes")
        if problems:
            mismatches.append({"tensor": name, "problems": problems})
    skip = ("GGUF.",)  # reader-synthesised header fields (version, counts), not metadata keys
    fa = {k: field_value(f) for k, f in a.fields.items() if not k.startswith(skip)}
    fb = {k: field_value(f) for k, f in b.fields.items() if not k.startswith(skip)}
    differing = sorted(k for k in fa.keys() & fb.keys() if fa[k] != fb[k])
    return {
        "tensors_pizoo": len(ta), "tensors_llama_cpp": len(tb),
        "only_in_pizoo": sorted(ta.keys() - tb.keys()), "only_in_llama_cpp": sorted(tb.keys() - ta.keys()),
        "same_order": [t.name for t in a.tensors] == [t.name for t in b.tensors],
        "mismatched_tensors": mismatches,
        "identical_tensors": not mismatches and ta.keys() == tb.keys(),
        "tensor_bytes": int(sum(t.n_bytes for t in a.tensors)),
        "metadata_only_in_pizoo": {k: _short(fa[k]) for k in sorted(fa.keys() - fb.keys())},
        "metadata_only_in_llama_cpp": {k: _short(fb[k]) for k in sorted(fb.keys() - fa.keys())},
        "metadata_differing": {k: {"pizoo": _short(fa[k]), "llama.cpp": _short(fb[k])} for k in differing},
    }


def _short(value, limit: int = 120) -> str:
    """A metadata value for the report: short ones whole, long ones cut (arrays with their length)."""
    text = json.dumps(value, default=str)
    if len(text) <= limit:
        return text
    size = f"{len(value)} items" if isinstance(value, list) else f"{len(text)} chars"
    return f"{text[:limit]}... ({size})"


# Why the metadata of the two files may differ although both describe the same model.
PIZOO_KEY_PREFIX = "pizoo."
EXPECTED_METADATA_DIFFERENCES = {
    "general.name": "each tool derives a display name from the folder name its own way",
    "general.basename": "pizoo records the folder name as the base name; llama.cpp leaves it out here",
    "general.size_label": "pizoo rounds the parameter count to the label, llama.cpp keeps one decimal",
    "llama.rope.scaling.type": "pizoo writes 'none' explicitly; llama.cpp's default is the same",
    "tokenizer.ggml.pre": "llama.cpp writes 'default' for this SentencePiece-style vocabulary; pizoo omits the key, "
                          "which llama.cpp reads as the same default",
    "tokenizer.ggml.add_space_prefix": "pizoo states the SentencePiece space prefix its normaliser adds",
    "tokenizer.ggml.tokens": "the synthetic tokenizer has 512 tokens for a 32000-row embedding: llama.cpp's "
                             "converter writes the 512, pizoo pads the list to vocab_size with [PADn] tokens so the "
                             "vocabulary matches the tensors",
    "tokenizer.ggml.scores": "a BPE tokenizer.json has no scores: llama.cpp writes -1000 for every token, pizoo 0.0 "
                             "(constant either way), over lists of different lengths (see tokens)",
    "tokenizer.ggml.token_type": "the lists differ in length (see tokens), and <unk> is UNKNOWN (2) in pizoo's "
                                 "file, CONTROL (3) in llama.cpp's; both type the <0xNN> byte-fallback tokens "
                                 "BYTE (6)",
}


def explain_metadata(comparison: dict) -> list[str]:
    """One line per differing metadata key: the known reason, or a flag that it is unexplained."""
    keys = (list(comparison["metadata_only_in_pizoo"]) + list(comparison["metadata_only_in_llama_cpp"])
            + list(comparison["metadata_differing"]))
    lines = [f"{k}: {EXPECTED_METADATA_DIFFERENCES.get(k, 'UNEXPLAINED difference')}"
             for k in sorted(set(keys)) if not k.startswith(PIZOO_KEY_PREFIX)]
    own = sorted(k for k in set(keys) if k.startswith(PIZOO_KEY_PREFIX))
    if own:
        lines.append(f"{', '.join(own)}: pizoo's own record of the source config for a lossless `pizoo import`; "
                     "llama.cpp ignores keys it does not know")
    return lines


# --- the benchmark ----------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="f16,q8_0")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")

    work = WORK_DIR / "b1"
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    machine, vers = machine_info(), versions()
    model = synthetic_1b_checkpoint()
    vendor = llama_cpp_sources(WORK_DIR)
    py_llama = converter_python(WORK_DIR, vendor)
    vers.update(converter_versions(py_llama, vendor, WORK_DIR))
    from pizoo.checkpoint import open_checkpoint

    n_params = open_checkpoint(model).num_params()
    input_bytes, warm_s = read_through(shard_files(model))
    print(f"input: {n_params / 1e9:.3f}B params, {input_bytes / 1e9:.2f} GB of bf16 shards, page-cached "
          f"(first read {warm_s:.1f} s)", flush=True)

    all_runs: list[Run] = []
    meds, ratios, targets, rows, comparisons, outputs_size = {}, {}, [], [], {}, {}
    for dtype in dtypes:
        print(f"== {dtype}: {args.rounds} alternated rounds", flush=True)
        variants, outputs = make_variants(model, dtype, work, py_llama, vendor, logs)
        runs = alternate(variants, args.rounds, between=lambda: read_through(shard_files(model)))
        for r in runs:
            r.label = f"{dtype} {r.label}"
        all_runs += runs
        m = medians(runs, ("wall_s", "peak_rss_mib", "user_s", "sys_s"))
        meds.update(m)
        llama, pizoo = m[f"{dtype} llama.cpp"], m[f"{dtype} pizoo"]
        floor, floor_sync = m[f"{dtype} copy (cat)"], m[f"{dtype} copy + fsync (dd)"]
        ratios[dtype] = {
            "time_pizoo_over_llama_cpp": ratio(pizoo["wall_s"], llama["wall_s"]),
            "rss_pizoo_over_llama_cpp": ratio(pizoo["peak_rss_mib"], llama["peak_rss_mib"]),
            "time_pizoo_over_copy": ratio(pizoo["wall_s"], floor["wall_s"]),
            "time_pizoo_over_copy_fsync": ratio(pizoo["wall_s"], floor_sync["wall_s"]),
            "time_llama_cpp_over_copy": ratio(llama["wall_s"], floor["wall_s"]),
            # CPU seconds drift less than wall time when other jobs compete for the cores.
            "cpu_time_pizoo_over_llama_cpp": ratio(pizoo["user_s"] + pizoo["sys_s"], llama["user_s"] + llama["sys_s"]),
        }
        targets += [
            target(f"{dtype}: time, pizoo / llama.cpp", ratios[dtype]["time_pizoo_over_llama_cpp"], 0.5),
            target(f"{dtype}: peak RSS, pizoo / llama.cpp", ratios[dtype]["rss_pizoo_over_llama_cpp"], 0.5),
            target(f"{dtype}: time, pizoo / copy floor (cat)", ratios[dtype]["time_pizoo_over_copy"], 2.0),
        ]
        outputs_size[dtype] = {k: v.stat().st_size for k, v in outputs.items() if v.exists()}
        for label in ("llama.cpp", "pizoo", "copy (cat)", "copy + fsync (dd)"):
            mm = m[f"{dtype} {label}"]
            raw = [r.wall_s for r in runs if r.label == f"{dtype} {label}"]
            rows.append([dtype, label, mm["wall_s"], ", ".join(f"{x:.2f}" for x in raw), mm["peak_rss_mib"],
                         mm["user_s"], mm["sys_s"], f"{outputs_size[dtype].get(label, 0) / 1e9:.3f}"])
        print(f"   comparing {outputs['pizoo'].name} with {outputs['llama.cpp'].name}", flush=True)
        comparisons[dtype] = compare_ggufs(outputs["pizoo"], outputs["llama.cpp"])
        comparisons[dtype]["metadata_explained"] = explain_metadata(comparisons[dtype])
        print(f"   identical tensors: {comparisons[dtype]['identical_tensors']}", flush=True)
        remove(*outputs.values())

    cmp_rows = [[d, c["tensors_pizoo"], c["tensors_llama_cpp"], "yes" if c["identical_tensors"] else "NO",
                 "yes" if c["same_order"] else "no", len(c["mismatched_tensors"]),
                 ", ".join(c["metadata_only_in_pizoo"]) or "-", ", ".join(c["metadata_only_in_llama_cpp"]) or "-",
                 ", ".join(c["metadata_differing"]) or "-"] for d, c in comparisons.items()]
    notes = [
        f"Input: pizoo.synthetic.write_synthetic_llama(num_layers={SYNTHETIC_1B_LAYERS}): {n_params / 1e9:.3f}B "
        f"parameters, {input_bytes / 1e9:.2f} GB of bf16 safetensors in {len(shard_files(model))} shards, read once "
        "before the runs and again before every run, so every run reads from the page cache.",
        "Every run starts with its previous output deleted and dirty pages synced (os.sync), outside the timing.",
        "llama.cpp: convert_hf_to_gguf.py unmodified from the llama-cpp-python sdist, with its own gguf-py on "
        "PYTHONPATH and its pinned requirements in a venv (torch from the host: the pinned CPU wheel's index is "
        "unreachable here). pizoo: `python -m pizoo.cli convert MODEL --to gguf --dtype D --out FILE`.",
        "Floors: `cat shards > file` (the plain copy the target uses) and the same with `dd conv=fsync`. pizoo "
        "writes through an atomic temporary file that is fsynced before the rename; llama.cpp does not fsync.",
        "The machine is shared (2 cores, several other agents' jobs running), so absolute times are noisy; the "
        "variants are alternated round by round and the targets are ratios of medians.",
        "Tensor comparison: every tensor of both files has the same name, order, GGML type, shape and bytes "
        "exactly when the table says 'identical tensors: yes'. Metadata keys that differ, and why: "
        + "; ".join(sorted({line for c in comparisons.values() for line in c["metadata_explained"]})) + ".",
    ]
    write_result(
        "b1_gguf_convert", title="B1: HF safetensors -> GGUF conversion (pizoo vs llama.cpp)",
        command=reproduce_command(), machine=machine, versions_=vers,
        settings={"model": f"synthetic Llama, {n_params / 1e9:.3f}B params, bf16, {len(shard_files(model))} shards",
                  "input_bytes": input_bytes, "rounds": args.rounds, "output types": ", ".join(dtypes),
                  "page cache": "inputs cached before every run"},
        runs=all_runs, medians_=meds, ratios=ratios, targets=targets,
        tables=[table(["type", "tool", "wall s (median)", "wall s (runs)", "peak RSS MiB", "user s", "sys s",
                       "output GB"], rows, "Wall time and peak RSS"),
                table(["type", "ratio", "value"], [[d, k, v] for d, r in ratios.items() for k, v in r.items()],
                      "Ratios of medians"),
                table(["type", "tensors pizoo", "tensors llama.cpp", "identical tensors", "same order",
                       "mismatched", "metadata only in pizoo", "metadata only in llama.cpp", "metadata differing"],
                      cmp_rows,
                      "Do the two GGUF files hold the same tensors? (GGUFReader: names, types, shapes, bytes)")],
        notes=notes, extra={"comparison": comparisons, "output_bytes": outputs_size})
    print("wrote bench/results/b1_gguf_convert.json and bench/RESULTS.md")


if __name__ == "__main__":
    main()
