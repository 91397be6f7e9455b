"""Shared fixtures: tiny real checkpoints built once per test session (real files on disk)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker gets one core's worth of threads; oversubscribing 2 cores with 2x2 torch
    # threads makes tiny forwards 10-100x slower.
    import torch

    torch.set_num_threads(1)

VARIANTS = ("llama", "llama-gqa-tied", "mistral", "qwen2")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def _build(root: Path, name: str, **kwargs) -> Path:
    from pizoo.synthetic import write_tiny_model

    path = root / name
    if not path.exists():
        write_tiny_model(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (pytestmark = usefixtures("one_thread")): two xdist
    workers on two cores, and small matmuls gain nothing from more."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fast_clex_recipe(tmp_path_factory) -> Path:
    """The clex recipe with a coarser ODE step (time_dt 0.1) so CPU tests stay fast."""
    from pizoo.recipes import recipe_path

    src = recipe_path("clex").read_text().replace("time_dt = 0.01", "time_dt = 0.1")
    p = tmp_path_factory.mktemp("recipes") / "clex-fast.toml"
    p.write_text(src)
    return p


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """60k characters of synthetic prose as a .txt file: calibration data for the tiny models."""
    from pizoo.synthetic import sample_text

    p = tmp_path_factory.mktemp("data") / "prose.txt"
    p.write_text(sample_text(60_000), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def tiny_model_factory(tiny_root):
    """tiny_model_factory(name, variant=..., tokenizer=..., rope=..., **config) -> Path (cached by name)."""

    def make(name: str, **kwargs) -> Path:
        return _build(tiny_root, name, **kwargs)

    return make


@pytest.fixture(scope="session", params=VARIANTS)
def tiny_variant(request, tiny_model_factory) -> Path:
    """One tiny checkpoint per supported variant; sentencepiece tokenizer for llama, BPE elsewhere."""
    tok = "sentencepiece" if request.param == "llama" else "bpe"
    return tiny_model_factory(request.param, variant=request.param, tokenizer=tok)


@pytest.fixture
def tiny_llama(tiny_model_factory, tmp_path) -> Path:
    """A private copy of the tiny llama (tests may modify it)."""
    src = tiny_model_factory("llama", variant="llama", tokenizer="sentencepiece")
    dst = tmp_path / "llama"
    shutil.copytree(src, dst)
    return dst
