"""Evaluation, one module per measurement.

- `text`: text -> tokens the way the model's tokenizer files say; token-stream fingerprints.
- `batching`: device, dtype, equal-length batches that halve on out-of-memory.
- `perplexity`: sliding-window perplexity (PI/YaRN protocol).
- `passkey`: the PI paper's passkey retrieval and k_max.
- `gate`: the publish gate's verdict.
- `cache`: model fingerprints and the result cache under PIZOO_HOME/eval-cache.
- `report`: eval.json, the plot, the terminal table.
- `runner`: `evaluate_model`, which puts them together (what `pizoo eval` and `pizoo extend` call).
- `llamacpp`: a GGUF measured by llama.cpp itself (`pizoo eval --backend llama.cpp`): perplexity, KL
  divergence and top-1 agreement against the f16/bf16 file, size and bits per weight (the `pizoo[quant]` extra).

The entry points are re-exported here: `from pizoo.eval import evaluate_model`.
"""

from .gate import raise_if_failed
from .report import format_report, write_report
from .runner import default_contexts, evaluate_model, find_base_model, parse_contexts

__all__ = ["default_contexts", "evaluate_model", "find_base_model", "format_report", "parse_contexts",
           "raise_if_failed", "write_report"]
