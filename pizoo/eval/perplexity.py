"""Sliding-window perplexity.

Perplexity follows the Position Interpolation and YaRN papers: windows of `ctx` tokens move over
each document by `stride` (256 in the papers) and each window scores only the tokens that no
earlier window scored, so every token after a document's first is scored exactly once, with
between ctx - stride and ctx - 1 tokens of context (the first window's tokens with less). The
total is token-weighted: exp(sum of NLL / number of scored tokens) over all documents (older
scripts average per-window means, which over-weights a short last window). `stride == ctx` is the
disjoint mode: each window then starts on the previous window's last token (a step of ctx - 1),
so every token is still scored once (lm-evaluation-harness's rolling windows do the same); HF's
plain loop would leave each window's first token unscored.

Following PI (proof-pile: documents of >= 32768 tokens, truncated to 32768), `evaluate_model`
scores the same token stream at every context length: the documents with at least max(ctx) tokens,
truncated to `doc_tokens` (default max(ctx)).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ..errors import PizooError
from .batching import auto_batch_size, model_device, run_batches

DEFAULT_STRIDE = 256


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of one document go in; targets [score_from, end) are scored."""

    doc: int
    begin: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def window_plan(n_tokens: int, ctx: int, stride: int, doc: int = 0) -> list[Window]:
    """The PI/YaRN windows over one document of n_tokens (see the module docstring).

    Window k starts at k * stride (stride < ctx: exactly HF's perplexity loop); a window never
    starts after the previous one's last token, which only matters in the disjoint mode.
    """
    if ctx < 2:
        raise PizooError(f"--ctx {ctx}: a window needs at least 2 tokens")
    if not 1 <= stride <= ctx:
        raise PizooError(f"--stride {stride}: must be between 1 and the window length {ctx} "
                         "(a larger stride would leave tokens unscored)")
    if n_tokens < 2:
        return []
    out: list[Window] = []
    begin, prev_end = 0, 0
    while True:
        end = min(begin + ctx, n_tokens)
        out.append(Window(doc, begin, end, max(prev_end, begin + 1)))
        if end == n_tokens:
            return out
        prev_end = end
        begin = min(begin + stride, end - 1)


@dataclass
class PerplexityResult:
    ctx: int
    stride: int
    ppl: float
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # tokens scored
    documents: int  # documents scored (at least ctx tokens)
    skipped_documents: int  # shorter than ctx
    windows: int
    forward_tokens: int  # tokens run through the model (the cost)
    seconds: float

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_second"] = round(self.forward_tokens / self.seconds, 1) if self.seconds > 0 else None
        return d


@torch.inference_mode()
def sliding_window_perplexity(model, token_docs: Sequence[Sequence[int] | torch.Tensor], ctx: int,
                              stride: int = DEFAULT_STRIDE, *, batch_tokens: int | None = None,
                              chunk: int = 1024, progress: bool = False) -> PerplexityResult:
    """Sliding-window perplexity of `model` (a pizoo LlamaModel) over the documents of >= ctx tokens.

    Windows of equal length are batched (`batch_tokens` tokens per forward pass; on GPU by default
    a share of free memory). The head and log-softmax run `chunk` positions at a time
    (`chunked_log_probs`), so memory does not grow with vocab x ctx.
    """
    from tqdm.auto import tqdm

    from ..model import chunked_log_probs

    docs = [torch.as_tensor(d, dtype=torch.long) for d in token_docs]
    longest = max((len(d) for d in docs), default=0)
    eligible = [i for i, d in enumerate(docs) if len(d) >= ctx]
    if not eligible:
        raise PizooError(f"no document has at least {ctx} tokens (the longest has {longest}); "
                         "use a smaller --ctx or longer documents (--data)")
    windows = [w for i in eligible for w in window_plan(len(docs[i]), ctx, stride, doc=i)]
    device = model_device(model)
    totals = {"nll": 0.0, "tokens": 0, "forward": 0}
    bar = tqdm(total=len(windows), desc=f"perplexity @ {ctx}", unit="win", disable=not progress, leave=False)

    def run(batch: list[Window]) -> None:
        ids = torch.stack([docs[w.doc][w.begin:w.end] for w in batch]).to(device)
        hidden = model(ids)
        # Position p predicts token p + 1: the targets [score_from, end) come from hidden states
        # [score_from - 1, end - 1) of the window.
        h = torch.cat([hidden[b, w.score_from - w.begin - 1:w.end - w.begin - 1] for b, w in enumerate(batch)])
        targets = torch.cat([ids[b, w.score_from - w.begin:] for b, w in enumerate(batch)])
        lp = chunked_log_probs(model, h, targets, chunk=chunk)
        totals["nll"] -= float(lp.double().sum())
        totals["tokens"] += int(targets.numel())
        totals["forward"] += int(ids.numel())
        bar.update(len(batch))

    start = time.perf_counter()
    try:
        run_batches(windows, lambda w: w.length, lambda n: auto_batch_size(model, n, batch_tokens), run,
                     f"perplexity at ctx {ctx}")
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    nll, n = totals["nll"], totals["tokens"]
    ppl = math.exp(nll / n) if nll / n < 700 else math.inf
    return PerplexityResult(ctx=ctx, stride=stride, ppl=ppl, nll=nll, tokens=n, documents=len(eligible),
                            skipped_documents=len(docs) - len(eligible), windows=len(windows),
                            forward_tokens=totals["forward"], seconds=round(seconds, 3))
