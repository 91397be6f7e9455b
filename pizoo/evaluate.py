"""Evaluation: sliding-window perplexity, passkey retrieval, the publish gate, eval.json and the plot.

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

Passkey retrieval uses the paper's prompt verbatim (task, filler, "The pass key is K. Remember it.
K is the pass key.", filler, "What is the pass key? The pass key is"), lines joined by newlines as
in the landmark-attention code the paper follows. A trial at distance d is a prompt of at most d
tokens (with the answer) whose key sits right after the task description, so the model must look
back about d tokens; distances are spread evenly over the window, `trials` random 5-digit keys
each (seeded). Two ways to score a trial (`mode`):
- "greedy" (default): retrieved iff greedy decoding emits the key's tokens. It is checked in one
  forward pass over prompt + key: at every key position the argmax must be the key's token, which
  is exactly what greedy decoding would produce (pizoo's model keeps no KV cache, so generating
  token by token would cost one forward pass per digit).
- "loglik": the exact-match likelihood p(key | prompt) = exp(sum of the key tokens' log-probs), the
  probability that sampling at temperature 1 reproduces the key; accuracy is its mean over trials.
The effective context k_max is the paper's: the largest distance k such that every tested
distance k' <= k has accuracy >= 20%.

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

Results are cached under PIZOO_HOME/eval-cache, keyed by the model's fingerprint (see
`model_fingerprint`), the exact token stream, and every setting that changes a number, so a
repeated evaluation is instant and never loads the model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .errors import GateFailed, PizooError
from .recipes import GateThresholds  # the gate's thresholds live with the recipes

CACHE_VERSION = "pizoo-eval-v1"
DEFAULT_STRIDE = 256
PASSKEY_THRESHOLD = 0.2  # the paper's k_max success rate
PASSKEY_MODES = ("greedy", "loglik")
CPU_BATCH_TOKENS = 16384

# The passkey prompt of the PI paper (after Mohtashami & Jaggi, landmark attention), verbatim.
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

Echo = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ================================================================================================
# Tokens


class TextEncoder:
    """Text -> token ids the way the model's tokenizer files say.

    tokenizer_config.json's add_bos_token / add_eos_token decide the special tokens when present
    (transformers does the same); otherwise tokenizer.json's own post-processor does, probed once.
    """

    def __init__(self, folder: str | Path):
        from .data import special_ids
        from .tokenizer import load_tokenizer, tokenizer_config

        self.folder = Path(folder)
        self.tokenizer = load_tokenizer(self.folder)
        tok_cfg = tokenizer_config(self.folder)
        if "add_bos_token" in tok_cfg or "add_eos_token" in tok_cfg:
            bos, eos = special_ids(self.folder, None, None)
            self.prefix = [bos] if tok_cfg.get("add_bos_token") and bos is not None else []
            self.suffix = [eos] if tok_cfg.get("add_eos_token") and eos is not None else []
        else:
            probe = "pass key"
            plain = self.tokenizer.encode(probe, add_special_tokens=False).ids
            full = self.tokenizer.encode(probe, add_special_tokens=True).ids
            at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
            self.prefix, self.suffix = full[:at], full[at + len(plain):]

    def plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def plain_batch(self, texts: list[str]) -> list[list[int]]:
        """plain() of each text, tokenized in parallel (the tokenizers library's thread pool)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def document(self, text: str) -> list[int]:
        """A whole document with the tokenizer's special tokens (what the model saw in training)."""
        return self.prefix + self.plain(text) + self.suffix

    def identity(self) -> str:
        """A hash of what decides tokenization (two models with equal identities tokenize alike)."""
        h = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            p = self.folder / name
            h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b""))
        h.update(json.dumps([self.prefix, self.suffix]).encode())
        return h.hexdigest()


def tokens_fingerprint(token_docs: Sequence[torch.Tensor]) -> str:
    """sha256 of the exact token stream (document boundaries included)."""
    h = hashlib.sha256()
    for t in token_docs:
        arr = t.to(torch.int64).contiguous().numpy()
        h.update(len(arr).to_bytes(8, "little"))
        h.update(arr.tobytes())
    return h.hexdigest()


# ================================================================================================
# Sliding-window perplexity


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PizooError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU (SDPA's flash kernel), fp32 on CPU, unless told otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from .checkpoint import parse_dtype

    return parse_dtype(dtype)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def auto_batch_size(model, length: int, batch_tokens: int | None = None) -> int:
    """Windows per forward pass: a token budget on CPU, a share of free memory on GPU."""
    if batch_tokens:
        return max(1, batch_tokens // length)
    device = _model_device(model)
    if device.type != "cuda":
        return max(1, CPU_BATCH_TOKENS // length)
    cfg = model.config
    elt = next(model.parameters()).element_size()
    # Live activations per token inside one layer (no grad): residual + normed input, q/k/v/out,
    # the MLP's gate/up/act; x2 for allocator slack. The head is applied in chunks (constant).
    width = 3 * cfg.hidden_size + 2 * cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim \
        + 3 * cfg.intermediate_size
    per_window = 2 * elt * width * length
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(64, (free * 0.6) // per_window)))


def _is_oom(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg or "can't allocate memory" in msg


def _run_batches(items: list, length_of: Callable[[Any], int], batch_size: Callable[[int], int],
                 run: Callable[[list], None], where: str) -> None:
    """Run `run` on batches of equal-length items; halve the batch on a GPU out-of-memory error."""
    by_len: dict[int, list] = {}
    for it in items:
        by_len.setdefault(length_of(it), []).append(it)
    for length, group in sorted(by_len.items(), reverse=True):
        size = batch_size(length)
        i = 0
        while i < len(group):
            batch = group[i:i + size]
            try:
                run(batch)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_oom(e):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if size == 1:
                    raise PizooError(f"{where}: one window of {length} tokens does not fit in memory; "
                                     "use a smaller --ctx or a device with more memory") from None
                size = max(1, size // 2)
                continue
            i += len(batch)


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

    from .model import chunked_log_probs

    docs = [torch.as_tensor(d, dtype=torch.long) for d in token_docs]
    longest = max((len(d) for d in docs), default=0)
    eligible = [i for i, d in enumerate(docs) if len(d) >= ctx]
    if not eligible:
        raise PizooError(f"no document has at least {ctx} tokens (the longest has {longest}); "
                         "use a smaller --ctx or longer documents (--data)")
    windows = [w for i in eligible for w in window_plan(len(docs[i]), ctx, stride, doc=i)]
    device = _model_device(model)
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
        _run_batches(windows, lambda w: w.length, lambda n: auto_batch_size(model, n, batch_tokens), run,
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


# ================================================================================================
# Passkey retrieval


def passkey_info_line(key: str | int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_prompt(key: str | int, filler_after: int, filler_before: int = 0) -> str:
    """The paper's prompt: task, filler x before, the key line, filler x after, the question."""
    parts = [PASSKEY_TASK]
    if filler_before:
        parts.append(" ".join([PASSKEY_FILLER] * filler_before))
    parts.append(passkey_info_line(key))
    if filler_after:
        parts.append(" ".join([PASSKEY_FILLER] * filler_after))
    parts.append(PASSKEY_QUESTION)
    return "\n".join(parts)


def random_passkey(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


@dataclass
class PasskeyTrial:
    distance: int  # the nominal distance (the most tokens prompt + answer may take)
    key: str
    prompt_ids: list[int]
    answer_ids: list[int]

    @property
    def length(self) -> int:
        """Tokens fed to the model: the prompt and all but the last answer token."""
        return len(self.prompt_ids) + len(self.answer_ids) - 1


def passkey_tokens(encoder: TextEncoder, key: str, filler: int) -> tuple[list[int], list[int]]:
    """(prompt ids with the tokenizer's prefix, answer ids): the answer is " KEY" as a continuation."""
    prompt = passkey_prompt(key, filler)
    return _prompt_and_answer(encoder, key, encoder.plain(prompt), encoder.plain(prompt + " " + key))


def passkey_tokens_batch(encoder: TextEncoder, items: Sequence[tuple[str, int]]) -> list[tuple[list[int], list[int]]]:
    """passkey_tokens for many (key, filler) pairs at once: the long prompts are tokenized in one
    parallel batch, which is most of a long-window passkey test's time on a many-core machine."""
    prompts = [passkey_prompt(key, n) for key, n in items]
    ids = encoder.plain_batch(prompts + [p + " " + key for p, (key, _) in zip(prompts, items)])
    return [_prompt_and_answer(encoder, key, ids[i], ids[len(items) + i]) for i, (key, _) in enumerate(items)]


def _prompt_and_answer(encoder: TextEncoder, key: str, prompt_plain: list[int],
                       full: list[int]) -> tuple[list[int], list[int]]:
    if full[:len(prompt_plain)] == prompt_plain and len(full) > len(prompt_plain):
        return encoder.prefix + prompt_plain, full[len(prompt_plain):]
    # The tokenizer merges across the prompt/answer boundary (e.g. "is▁8"), so the prompt's own
    # tokens are kept (what the model is asked) and the answer is the key's tokens that decode to
    # exactly " KEY" after the prompt; tokenizers that add the leading space themselves (SentencePiece's
    # ▁) need the bare key.
    decode = encoder.tokenizer.decode
    expected = decode(prompt_plain) + " " + key
    candidates = [encoder.plain(" " + key), encoder.plain(key)]
    answer = next((c for c in candidates if decode(prompt_plain + c) == expected), candidates[0])
    return encoder.prefix + prompt_plain, answer


def _fit_filler_down(encoder: TextEncoder, key: str, distance: int, start: int) -> tuple[int, list[int], list[int]] | None:
    """The most filler repetitions, at most `start`, whose prompt + answer fit in `distance` tokens."""
    for n in range(start, -1, -1):
        prompt, answer = passkey_tokens(encoder, key, n)
        if len(prompt) + len(answer) <= distance:
            return n, prompt, answer
    return None


def _fit_filler(encoder: TextEncoder, key: str, distance: int, guess: int) -> tuple[int, list[int], list[int]] | None:
    """The most filler repetitions whose prompt + answer fit in `distance` tokens (None: none fit).

    The guess is first corrected with the token count it gives (a few secant steps on the
    measured tokens per repetition), so that the one-repetition steps that settle the exact count
    are few: at 32k each step tokenizes ~120 kB twice."""
    n0 = sum(map(len, passkey_tokens(encoder, key, 0)))
    n = max(0, guess)
    for _ in range(6):
        if n == 0:
            break
        total = sum(map(len, passkey_tokens(encoder, key, n)))
        step = math.floor((distance - total) / ((total - n0) / n)) if total > n0 else 0
        if step == 0:
            break
        n = max(0, n + step)
    fit = _fit_filler_down(encoder, key, distance, n)
    if fit is None:
        return None
    while True:
        n = fit[0] + 1
        prompt, answer = passkey_tokens(encoder, key, n)
        if len(prompt) + len(answer) > distance:
            return fit
        fit = (n, prompt, answer)


def passkey_min_length(encoder: TextEncoder) -> int:
    """Tokens of the shortest prompt (no filler) plus its answer."""
    prompt, answer = passkey_tokens(encoder, "12345", 0)
    return len(prompt) + len(answer)


def spread_passkey_distances(window: int, n: int, minimum: int = 1) -> list[int]:
    """n distances spread evenly over (0, window], each at least `minimum` (duplicates dropped)."""
    if n < 1:
        raise PizooError(f"--passkey-distances {n}: must be at least 1")
    if window < minimum:
        raise PizooError(f"passkey: the window of {window} tokens is shorter than the shortest passkey prompt "
                         f"({minimum} tokens); use a larger --ctx or --no-passkey")
    return sorted({max(minimum, round(window * i / n)) for i in range(1, n + 1)})


def build_passkey_trials(encoder: TextEncoder, distances: Sequence[int], trials: int, seed: int) -> list[PasskeyTrial]:
    """`trials` prompts per distance, with seeded random 5-digit keys (a distance's keys do not
    depend on which other distances are tested)."""
    if trials < 1:
        raise PizooError(f"--passkey-trials {trials}: must be at least 1")
    base_p, base_a = passkey_tokens(encoder, "12345", 0)
    one_p, _ = passkey_tokens(encoder, "12345", 1)
    per_filler = max(1, len(one_p) - len(base_p))
    keys = {}
    for d in distances:
        rng = random.Random(f"pizoo-passkey:{seed}:{d}")
        keys[d] = [random_passkey(rng) for _ in range(trials)]
    # The first key of each distance finds its filler count. Later keys (all 5 digits, within a
    # token or two of the same length) start there and only step down when they do not fit; their
    # prompts at that count are tokenized together in one parallel batch.
    first = {}
    for d in distances:
        fit = _fit_filler(encoder, keys[d][0], d, (d - len(base_p) - len(base_a)) // per_filler)
        if fit is None:
            raise PizooError(f"passkey: distance {d} is shorter than the shortest passkey prompt; use a larger --ctx")
        first[d] = fit
    rest = [(d, key) for d in distances for key in keys[d][1:]]
    batch = dict(zip(rest, passkey_tokens_batch(encoder, [(key, first[d][0]) for d, key in rest])))
    out = []
    for d in distances:
        filler, prompt, answer = first[d]
        out.append(PasskeyTrial(d, keys[d][0], prompt, answer))
        for key in keys[d][1:]:
            prompt, answer = batch[(d, key)]
            if filler != first[d][0] or len(prompt) + len(answer) > d:
                fit = _fit_filler_down(encoder, key, d, filler)  # the one-by-one way: rare
                if fit is None:
                    raise PizooError(f"passkey: distance {d} is shorter than the shortest passkey prompt; "
                                     "use a larger --ctx")
                filler, prompt, answer = fit
            out.append(PasskeyTrial(d, key, prompt, answer))
    return out


def effective_context(accuracy_by_distance: Mapping[int, float], threshold: float = PASSKEY_THRESHOLD) -> int:
    """k_max (PI paper): the largest tested k such that every tested k' <= k has accuracy >= threshold.

    0 when the shortest distance already fails.
    """
    k_max = 0
    for d in sorted(accuracy_by_distance):
        if accuracy_by_distance[d] >= threshold:
            k_max = d
        else:
            break
    return k_max


@dataclass
class PasskeyResult:
    window: int
    mode: str
    trials: int
    seed: int
    accuracy_by_distance: dict[int, float]
    k_max: int
    prompt_tokens_by_distance: dict[int, float]  # mean tokens fed per distance (<= the distance)
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"window": self.window, "mode": self.mode, "trials": self.trials, "seed": self.seed,
                "threshold": PASSKEY_THRESHOLD, "k_max": self.k_max,
                "accuracy_by_distance": {str(d): a for d, a in sorted(self.accuracy_by_distance.items())},
                "prompt_tokens_by_distance": {str(d): t for d, t in sorted(self.prompt_tokens_by_distance.items())},
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PasskeyResult":
        return cls(window=d["window"], mode=d["mode"], trials=d["trials"], seed=d["seed"],
                   accuracy_by_distance={int(k): v for k, v in d["accuracy_by_distance"].items()},
                   k_max=d["k_max"], prompt_tokens_by_distance={int(k): v for k, v in d["prompt_tokens_by_distance"].items()},
                   seconds=d["seconds"])


@torch.inference_mode()
def score_passkey_trials(model, items: Sequence[PasskeyTrial], mode: str = "greedy", *,
                         batch_tokens: int | None = None, progress: bool = False, desc: str = "passkey") -> list[float]:
    """One score per trial, in order: 1.0/0.0 (greedy: every key token is the argmax) or the
    exact-match likelihood p(key | prompt) (loglik). Trials of equal length share a forward pass."""
    from tqdm.auto import tqdm

    if mode not in PASSKEY_MODES:
        raise PizooError(f"--passkey-mode {mode}: use one of {', '.join(PASSKEY_MODES)}")
    device = _model_device(model)
    scores: list[float | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="trial", disable=not progress, leave=False)

    def run(batch: list[tuple[int, PasskeyTrial]]) -> None:
        ids = torch.tensor([t.prompt_ids + t.answer_ids[:-1] for _, t in batch], device=device)
        hidden = model(ids)
        for b, (i, t) in enumerate(batch):
            p, a = len(t.prompt_ids), len(t.answer_ids)
            # Hidden state p - 1 + j predicts answer token j (teacher forcing on the key itself).
            logits = model.logits(hidden[b, p - 1:p - 1 + a]).float()
            answer = torch.tensor(t.answer_ids, device=device)
            if mode == "greedy":
                scores[i] = float(bool((logits.argmax(-1) == answer).all()))
            else:
                scores[i] = math.exp(float(torch.log_softmax(logits, -1).gather(-1, answer[:, None]).sum()))
        bar.update(len(batch))

    try:
        _run_batches(list(enumerate(items)), lambda it: it[1].length,
                     lambda n: auto_batch_size(model, n, batch_tokens), run, desc)
    finally:
        bar.close()
    return [float(s) for s in scores]


def passkey_retrieval(model, encoder: TextEncoder, window: int, *, distances: int | Sequence[int] = 32,
                      trials: int = 10, seed: int = 0, mode: str = "greedy", batch_tokens: int | None = None,
                      progress: bool = False) -> PasskeyResult:
    """Passkey accuracy per distance over a window of `window` tokens, and k_max (see module doc)."""
    if mode not in PASSKEY_MODES:
        raise PizooError(f"--passkey-mode {mode}: use one of {', '.join(PASSKEY_MODES)}")
    if isinstance(distances, int):
        distances = spread_passkey_distances(window, distances, passkey_min_length(encoder))
    items = build_passkey_trials(encoder, distances, trials, seed)
    start = time.perf_counter()
    scores = score_passkey_trials(model, items, mode, batch_tokens=batch_tokens, progress=progress,
                                  desc=f"passkey @ {window}")
    by_distance: dict[int, list[float]] = {d: [] for d in distances}
    lengths: dict[int, list[int]] = {d: [] for d in distances}
    for t, s in zip(items, scores):
        by_distance[t.distance].append(s)
        lengths[t.distance].append(len(t.prompt_ids) + len(t.answer_ids))
    accuracy = {d: sum(v) / len(v) for d, v in by_distance.items()}
    return PasskeyResult(window=window, mode=mode, trials=trials, seed=seed, accuracy_by_distance=accuracy,
                         k_max=effective_context(accuracy),
                         prompt_tokens_by_distance={d: sum(v) / len(v) for d, v in lengths.items()},
                         seconds=round(time.perf_counter() - start, 3))


# ================================================================================================
# The gate


def apply_gate(thresholds: GateThresholds, *, ppl: Mapping[int, float], target: int, original: int,
               base_ppl: float | None = None, base_context: int | None = None,
               passkey: PasskeyResult | None = None) -> dict[str, Any]:
    """The verdict: {passed, reasons, thresholds, checks}; one reason line per check."""
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
    if all(c["status"] == "skipped" for c in checks):
        # A publish gate that verified nothing must not pass.
        checks.append({"name": "coverage", "status": "fail",
                       "reason": "FAIL: no gate check could run; give --baseline BASE or run the passkey test, "
                                 "or pass --no-gate to only measure"})
    passed = not any(c["status"] == "fail" for c in checks)
    return {"passed": passed, "reasons": [c["reason"] for c in checks], "thresholds": asdict(thresholds),
            "checks": checks}


# ================================================================================================
# Fingerprints and the cache


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(min(n, 100 << 20))


def _sample_bytes(path: Path, size: int, samples: int = 16, width: int = 1 << 16) -> bytes:
    """`samples` evenly spaced slices of the file (new weights change them; a copy does not)."""
    out = []
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, (size - width) * i // max(1, samples - 1)))
            out.append(f.read(width))
    return b"".join(out)


def model_fingerprint(folder: str | Path, *, full: bool = False) -> str:
    """A sha256 identifying a model folder's numbers.

    Fast mode (default): the bytes of config.json and the tokenizer files, and for every weight
    file its name, size, modification time, safetensors header and 16 evenly spaced 64 KiB
    samples. New weights, a new config, a new tokenizer or a rewritten file all change it; a copy
    that keeps modification times (cp -p, shutil.copytree) does not. `full=True` hashes every byte
    of every weight file instead of sizes, times and samples (slow for big models, exact).
    """
    from .checkpoint import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES
    from .fsutil import sha256_file

    folder = Path(folder)
    h = hashlib.sha256(b"pizoo-model-fingerprint-v1\0" + (b"full" if full else b"fast"))
    for name in ("config.json", INDEX_FILE) + TOKENIZER_FILES:
        p = folder / name
        if p.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    for p in sorted(folder.glob("*.safetensors")):
        st = p.stat()
        h.update(p.name.encode() + b"\0")
        if full:
            h.update(sha256_file(p).encode())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(hashlib.sha256(_safetensors_header(p)).digest())
            h.update(hashlib.sha256(_sample_bytes(p, st.st_size)).digest())
    if not (folder / SINGLE_FILE).is_file() and not (folder / INDEX_FILE).is_file():
        raise PizooError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    return h.hexdigest()


class EvalCache:
    """JSON results under PIZOO_HOME/eval-cache/<key[:2]>/<key>.json, written atomically."""

    def __init__(self, root: Path | None = None, enabled: bool = True):
        from .resolve import pizoo_home

        self.root = Path(root) if root is not None else pizoo_home() / "eval-cache"
        self.enabled = enabled

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if not self.enabled:
            return None
        p = self._path(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a missing or unreadable entry is just a miss

    def put(self, key: str, value: dict) -> None:
        if not self.enabled:
            return
        from .fsutil import atomic_write_json

        try:
            atomic_write_json(self._path(key), value)
        except OSError:
            pass  # the cache is an optimisation; a read-only PIZOO_HOME must not fail the evaluation


# ================================================================================================
# Putting it together


@dataclass
class _Subject:
    """A model under evaluation, loaded on first use (a fully cached evaluation never loads it)."""

    path: Path
    spec: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    _model: Any = field(default=None, repr=False)
    _encoder: TextEncoder | None = field(default=None, repr=False)

    @property
    def config(self):
        from .config import ModelConfig

        return ModelConfig.from_file(self.path / "config.json")

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = TextEncoder(self.path)
        return self._encoder

    @property
    def model(self):
        if self._model is None:
            from .model import load_model

            self._model = load_model(self.path, device=self.device, dtype=self.dtype)
        return self._model

    def release(self) -> None:
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def parse_contexts(text: str | int | Iterable[int] | None, option: str = "--ctx") -> list[int] | None:
    """'2048,4096,8k' / 8192 / [2048, 4096] -> sorted unique ints (None stays None). `option` is the
    command-line option the text came from, named in the errors."""
    from .options import check_context

    if text is None:
        return None
    if isinstance(text, int):
        items: list = [text]
    elif isinstance(text, str):
        items = [s.strip() for s in text.split(",") if s.strip()]
    else:
        items = list(text)
    out = []
    for s in items:
        try:
            v = int(s) if not isinstance(s, str) else (int(s[:-1]) * 1024 if s.lower().endswith("k") else int(s))
        except ValueError:
            raise PizooError(f"{option}: '{s}' is not a number; give lengths like 2048,4096,8k") from None
        if v < 2:
            raise PizooError(f"{option}: {v} is too short; a window needs at least 2 tokens")
        out.append(check_context(v, option))
    if not out:
        raise PizooError(f"{option}: no context lengths given; e.g. {option} 2048,4096,8192")
    return sorted(set(out))


def default_contexts(original: int, target: int) -> list[int]:
    """The original length, its doublings below the target, and the target."""
    out, c = [original], original * 2
    while c < target:
        out.append(c)
        c *= 2
    out.append(target)
    return sorted(set(out))


def find_base_model(folder: str | Path) -> str | None:
    """The base a calibrated model came from: calibration.json's base_model (path if it exists,
    else hub_id), else config.json's pizoo block `base_model` (a string or such a dict)."""
    from .fsutil import read_json

    folder = Path(folder)

    def pick(entry: Any) -> str | None:
        if isinstance(entry, str) and entry:
            return entry
        if isinstance(entry, dict):
            path = entry.get("path")
            if isinstance(path, str) and path and Path(path).expanduser().exists():
                return path
            for key in ("hub_id", "repo_id", "name"):
                if isinstance(entry.get(key), str) and entry[key]:
                    return entry[key]
            if isinstance(path, str) and path:
                return path
        return None

    cal = folder / "calibration.json"
    if cal.is_file():
        found = pick(read_json(cal, "calibration.json").get("base_model"))
        if found:
            return found
    cfg = folder / "config.json"
    if cfg.is_file():
        return pick((read_json(cfg, "config.json").get("pizoo") or {}).get("base_model"))
    return None


@dataclass
class _Corpus:
    texts: list[tuple[str, str]]  # (id, text) of the selected documents
    tokens: list[torch.Tensor]
    fingerprint: str  # over the ids and texts read
    read: int
    longest: int


def _select_documents(encoder: TextEncoder, data, split: str, min_tokens: int, doc_tokens: int,
                      max_documents: int | None) -> _Corpus:
    """Documents with >= min_tokens tokens, truncated to doc_tokens; stops after max_documents."""
    from .data import fingerprint_update, iter_documents

    h = hashlib.sha256()
    texts, tokens, read, longest = [], [], 0, 0
    for doc in iter_documents(data, split=split):
        read += 1
        fingerprint_update(h, doc)  # the same fingerprint as data_fingerprint over the documents read
        ids = encoder.document(doc.text)
        longest = max(longest, len(ids))
        if len(ids) >= min_tokens:
            texts.append((doc.id, doc.text))
            tokens.append(torch.tensor(ids[:doc_tokens], dtype=torch.long))
            if max_documents is not None and len(tokens) >= max_documents:
                break
    if read == 0:
        from .data import describe_sources

        raise PizooError(f"--data {', '.join(describe_sources(data))}: no {split} documents")
    if not tokens:
        raise PizooError(f"no document has at least {min_tokens} tokens (the longest of {read} has {longest}); "
                         "use a smaller --ctx or longer documents (--data)")
    return _Corpus(texts, tokens, h.hexdigest(), read, longest)


def _measure_ppl(subject: _Subject, tokens: list[torch.Tensor], token_fp: str, ctx: int, stride: int,
                 cache: EvalCache, batch_tokens: int | None, progress: bool) -> dict[str, Any]:
    key = cache.key(kind="ppl", model=subject.fingerprint, tokens=token_fp, ctx=ctx, stride=stride,
                    device=subject.device.type, dtype=str(subject.dtype))
    hit = cache.get(key)
    if hit is not None:
        return {**hit, "cached": True}
    res = sliding_window_perplexity(subject.model, tokens, ctx, stride, batch_tokens=batch_tokens,
                                    progress=progress).to_json()
    cache.put(key, res)
    return {**res, "cached": False}


def _measure_passkey(subject: _Subject, window: int, distances: int, trials: int, seed: int, mode: str,
                     cache: EvalCache, batch_tokens: int | None, progress: bool) -> dict[str, Any]:
    key = cache.key(kind="passkey", model=subject.fingerprint, window=window, distances=distances, trials=trials,
                    seed=seed, mode=mode, device=subject.device.type, dtype=str(subject.dtype))
    hit = cache.get(key)
    if hit is not None:
        return {**hit, "cached": True}
    res = passkey_retrieval(subject.model, subject.encoder, window, distances=distances, trials=trials, seed=seed,
                            mode=mode, batch_tokens=batch_tokens, progress=progress).to_json()
    cache.put(key, res)
    return {**res, "cached": False}


def _thresholds(gate: GateThresholds | Mapping | None) -> GateThresholds:
    if gate is None:
        return GateThresholds()
    if isinstance(gate, Mapping):
        return GateThresholds(**gate)
    return gate


def _validate_thresholds(t: GateThresholds) -> None:
    for name in ("max_ppl_ratio_target", "max_ppl_ratio_original"):
        v = getattr(t, name)
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise PizooError(f"gate: {name} must be a positive number, got {v!r}")
    if not 0 <= t.min_passkey_accuracy <= 1:
        raise PizooError(f"gate: min_passkey_accuracy must be in [0, 1], got {t.min_passkey_accuracy!r}")


class _Log:
    """Notes and warnings: shown as they happen (echo) and kept for eval.json."""

    def __init__(self, echo: Echo | None):
        self.echo = echo or _quiet
        self.notes: list[str] = []
        self.warnings: list[str] = []

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.echo(f"note: {msg}")

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self.echo(f"warning: {msg}")


def _open_subject(spec: str | Path, full_hash: bool, device: torch.device, dtype: torch.dtype,
                  what: str = "model") -> tuple[_Subject, Any, str]:
    """Resolve and validate a model (config and weights) before any long work; (subject, cfg, source)."""
    from .checkpoint import open_checkpoint
    from .resolve import resolve_model

    try:
        resolved = resolve_model(spec)
        ckpt = open_checkpoint(resolved.path)
    except PizooError as e:
        if what == "model":
            raise
        raise PizooError(f"--baseline {spec}: {e}; pass another --baseline or --no-baseline") from None
    subject = _Subject(resolved.path, str(spec), model_fingerprint(resolved.path, full=full_hash), device, dtype)
    return subject, ckpt.config, resolved.source


def _measure_baseline(base: _Subject, base_cfg, model: _Subject, corpus: _Corpus, token_fp: str,
                      contexts: list[int], original: int, *, stride: int, all_ctx: bool, store: EvalCache,
                      batch_tokens: int | None, progress: bool, log: _Log) -> dict[str, Any]:
    """The base model's perplexity on the same documents: at its original context (the gate's
    reference) and at every shorter requested context (all of them with all_ctx)."""
    base_context = base_cfg.original_context
    if base_cfg.rope.is_scaled:
        log.warn(f"baseline {base.spec} itself uses '{base_cfg.rope.method}' RoPE scaling; compare with the "
                 "unscaled base model")
    if base_context != original:
        log.note(f"the baseline's original context ({base_context}) differs from this model's ({original})")
    if base.encoder.identity() == model.encoder.identity():
        tokens, fp = corpus.tokens, token_fp
    else:
        log.warn("the baseline's tokenizer differs from the model's; perplexities are per token of different "
                 "tokenizations and compare only roughly")
        limit = len(corpus.tokens[0])
        tokens = [torch.tensor(base.encoder.document(t)[:limit], dtype=torch.long) for _, t in corpus.texts]
        fp = tokens_fingerprint(tokens)
    ctxs = sorted({base_context} | {c for c in contexts if all_ctx or c <= base_context})
    results = []
    for c in ctxs:
        r = _measure_ppl(base, tokens, fp, c, min(stride, c), store, batch_tokens, progress)
        r["extrapolation"] = c > base_cfg.context_length
        results.append(r)
        log.echo(f"baseline ppl @ {c}: {r['ppl']:.4f}{' (cached)' if r['cached'] else ''}")
    base.release()
    return {"model": {"path": str(base.path), "spec": base.spec, "hash": base.fingerprint},
            "original_context": base_context,
            "ppl_at_original": next(r["ppl"] for r in results if r["ctx"] == base_context), "results": results}


def _check_arguments(*, stride: int, passkey_mode: str, baseline_ctx: str, max_documents: int | None,
                     doc_tokens: int | None) -> None:
    if passkey_mode not in PASSKEY_MODES:
        raise PizooError(f"--passkey-mode {passkey_mode}: use one of {', '.join(PASSKEY_MODES)}")
    if baseline_ctx not in ("original", "all"):
        raise PizooError(f"--baseline-ctx {baseline_ctx}: use original or all")
    if stride < 1:
        raise PizooError(f"--stride {stride}: must be at least 1")
    if max_documents is not None and max_documents < 1:
        raise PizooError(f"--max-docs {max_documents}: must be at least 1")
    if doc_tokens is not None and doc_tokens < 2:
        raise PizooError(f"--doc-tokens {doc_tokens}: must be at least 2")


def evaluate_model(model: str | Path, *, ctx: int | str | Iterable[int] | None = None, data=None,
                   split: str = "heldout", stride: int = DEFAULT_STRIDE, passkey: bool = True,
                   baseline: str | Path | bool | None = None, gate: GateThresholds | Mapping | bool | None = None,
                   out: str | Path | None = None, passkey_mode: str = "greedy", passkey_trials: int = 10,
                   passkey_distances: int = 32, passkey_window: int | None = None, seed: int = 0,
                   max_documents: int | None = None, doc_tokens: int | None = None,
                   baseline_ctx: str = "original", device: str | None = None, dtype: str | None = None,
                   batch_tokens: int | None = None, cache: bool = True, full_hash: bool = False,
                   plot: bool = True, progress: bool = True, raise_on_fail: bool = False,
                   echo: Echo | None = None) -> dict[str, Any]:
    """Evaluate a model and apply the gate; the one library entry point. Returns the eval.json dict.

    model: HF folder, .gguf file (imported), zoo name or Hub id. ctx: lengths (default: the
    original context, its doublings, the target); with the gate on, the original and target
    contexts are always measured. data: `pizoo.data` sources (None: the default offline corpus),
    `split` heldout by default so training text is never scored. The documents with at least
    max(ctx) tokens, truncated to doc_tokens (default max(ctx)) and at most max_documents of them,
    are scored at every ctx. baseline: a model spec, None to find the base of a calibrated model
    (calibration.json / config.json pizoo.base_model), False for none; it is measured at its
    original context (baseline_ctx="all": at every ctx too). gate: GateThresholds or a dict of its
    fields (None: defaults; False: no gate). passkey_window: the passkey window (default max(ctx)).
    out: folder for eval.json and ppl.png (None: nothing is written but the cache). echo: called
    with progress lines, notes and warnings. raise_on_fail: raise GateFailed (exit code 3) after
    writing the report when the gate fails.
    """
    from . import __version__
    from .data import default_corpus_note, describe_sources

    _check_arguments(stride=stride, passkey_mode=passkey_mode, baseline_ctx=baseline_ctx,
                     max_documents=max_documents, doc_tokens=doc_tokens)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise PizooError(f"--out {out}: exists and is not a folder")  # before any work, not after it
    log = _Log(echo)
    gate_on = gate is not False
    thresholds = _thresholds(None if isinstance(gate, bool) else gate)
    _validate_thresholds(thresholds)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    store = EvalCache(enabled=cache)

    subject, cfg, source = _open_subject(model, full_hash, dev, dt)
    target, original = cfg.context_length, cfg.original_context
    contexts = parse_contexts(ctx) or default_contexts(original, target)
    if gate_on:
        missing = [c for c in (original, target) if c not in contexts]
        if missing:
            contexts = sorted(set(contexts) | set(missing))
            log.note(f"added ctx {', '.join(map(str, missing))} (the model's original/target context) for the gate; "
                     "pass --no-gate to measure only the listed lengths")
    for c in contexts:
        if c > target:
            kind = f"'{cfg.rope.method}' scaling up to {target}" if cfg.rope.is_scaled else "no RoPE scaling"
            log.warn(f"ctx {c} is beyond the model's context of {target} ({kind}): this is extrapolation; "
                     "measuring it anyway (the papers' baseline)")

    # The baseline is resolved and validated before any long work, so a bad one fails fast.
    base = base_cfg = None
    if baseline is None:
        baseline = find_base_model(subject.path)
        if baseline:
            log.note(f"baseline: the base model recorded with this model, {baseline}")
    if baseline not in (None, False, True, ""):
        base, base_cfg, _ = _open_subject(baseline, full_hash, dev, dt, what="baseline")
    elif gate_on:
        log.note("no baseline: the gate's perplexity checks are skipped (pass --baseline BASE)")

    window = passkey_window or max(contexts)
    if passkey:  # fail before the perplexity work if the passkey settings cannot run
        spread_passkey_distances(window, passkey_distances, passkey_min_length(subject.encoder))
        if passkey_trials < 1:
            raise PizooError(f"--passkey-trials {passkey_trials}: must be at least 1")

    # Every context (the baseline's original included) scores the same documents and tokens.
    longest_ctx = max(contexts + ([base_cfg.original_context] if base_cfg else []))
    doc_tokens = doc_tokens or longest_ctx
    if doc_tokens < longest_ctx:
        raise PizooError(f"--doc-tokens {doc_tokens}: must be at least the longest context measured ({longest_ctx})")
    corpus = _select_documents(subject.encoder, data, split, longest_ctx, doc_tokens, max_documents)
    token_fp = tokens_fingerprint(corpus.tokens)
    log.echo(f"data: {len(corpus.tokens)} of {corpus.read} {split} documents have >= {longest_ctx} tokens; "
             f"scoring the first {doc_tokens} tokens of each")
    if data is None:
        log.note(default_corpus_note().replace("a real calibration", "a real evaluation"))

    results = []
    for c in contexts:
        s = min(stride, c)
        if s != stride:
            log.note(f"ctx {c}: stride {stride} is longer than the window; using the disjoint mode (stride {c})")
        r = _measure_ppl(subject, corpus.tokens, token_fp, c, s, store, batch_tokens, progress)
        r["extrapolation"] = c > target
        results.append(r)
        log.echo(f"ppl @ {c}: {r['ppl']:.4f} ({r['tokens']} tokens, {r['documents']} documents"
                 f"{', cached' if r['cached'] else ''})")
    passkey_report = None
    if passkey:
        passkey_report = _measure_passkey(subject, window, passkey_distances, passkey_trials, seed, passkey_mode,
                                          store, batch_tokens, progress)
        log.echo(f"passkey @ {window}: k_max {passkey_report['k_max']}"
                 f"{' (cached)' if passkey_report['cached'] else ''}")
    subject.release()  # free the model before the baseline is loaded

    baseline_report = None
    if base is not None:
        baseline_report = _measure_baseline(base, base_cfg, subject, corpus, token_fp, contexts, original,
                                            stride=stride, all_ctx=baseline_ctx == "all", store=store,
                                            batch_tokens=batch_tokens, progress=progress, log=log)
    gate_report = None
    if gate_on:
        gate_report = apply_gate(
            thresholds, ppl={r["ctx"]: r["ppl"] for r in results}, target=target, original=original,
            base_ppl=baseline_report["ppl_at_original"] if baseline_report else None,
            base_context=baseline_report["original_context"] if baseline_report else None,
            passkey=PasskeyResult.from_json(passkey_report) if passkey_report else None)

    report: dict[str, Any] = {
        "pizoo_version": __version__,
        "model": {"path": str(subject.path), "spec": str(model), "source": source, "hash": subject.fingerprint,
                  "hash_mode": "full" if full_hash else "fast", "context_length": target,
                  "original_context": original, "rope": cfg.rope.describe()},
        "data": {"sources": describe_sources(data), "split": split, "fingerprint": corpus.fingerprint,
                 "documents_read": corpus.read, "documents": len(corpus.tokens), "longest_document": corpus.longest,
                 "doc_tokens": doc_tokens, "tokens_fingerprint": token_fp},
        "settings": {"stride": stride, "device": dev.type, "dtype": str(dt).removeprefix("torch."),
                     "passkey": passkey, "seed": seed},
        "results": results,
        "passkey": passkey_report,
        "baseline": baseline_report,
        "gate": gate_report,
        "plot": None,
        "notes": log.notes,
        "warnings": log.warnings,
    }
    if out is not None:
        write_report(report, out, plot=plot)
    if raise_on_fail:
        raise_if_failed(report, out)
    return report


def raise_if_failed(report: Mapping[str, Any], out: str | Path | None = None) -> None:
    """GateFailed (exit 3) with the first failing reason when the report's gate failed."""
    gate = report.get("gate")
    if gate and not gate["passed"]:
        failing = [r for r in gate["reasons"] if r.startswith("FAIL")]
        where = f" (all reasons in {Path(out) / 'eval.json'})" if out is not None else ""
        raise GateFailed(f"gate failed: {failing[0].removeprefix('FAIL: ') if failing else 'see reasons'}"
                         f"{'; ' + str(len(failing) - 1) + ' more' if len(failing) > 1 else ''}{where}")


# ================================================================================================
# Output: eval.json, the plot, the terminal table


def write_report(report: dict[str, Any], out: str | Path, *, plot: bool = True) -> Path:
    """Write out/eval.json (atomically) and out/ppl.png when matplotlib is installed."""
    from .fsutil import atomic_write_json, make_dirs

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PizooError(f"--out {out}: exists and is not a folder")
    make_dirs(out)
    if plot:
        png = plot_perplexity(report, out / "ppl.png")
        if png is None:
            msg = "matplotlib is not installed: no plot (pip install 'pizoo[plot]')"
            if msg not in report["notes"]:
                report["notes"].append(msg)
        else:
            report["plot"] = png.name
    path = out / "eval.json"
    atomic_write_json(path, _json_safe(report))
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


def plot_perplexity(report: Mapping[str, Any], path: str | Path) -> Path | None:
    """PNG of perplexity against context length, the model vs its baseline; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .fsutil import atomic_file

    path = Path(path)
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
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def format_report(report: Mapping[str, Any]) -> str:
    """The terminal table: perplexity per context (with the base's), passkey, the verdict."""
    lines = []
    m, d = report["model"], report["data"]
    lines.append(f"model     {m['path']}  (hash {m['hash'][:12]}, context {m['context_length']}, "
                 f"original {m['original_context']}, rope {m['rope']['type']})")
    lines.append(f"data      {', '.join(d['sources'])} [{d['split']}]: {d['documents']} documents x "
                 f"{d['doc_tokens']} tokens (fingerprint {d['fingerprint'][:12]})")
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
    gate = report.get("gate")
    if gate:
        lines.append("")
        lines.append(f"gate      {'PASSED' if gate['passed'] else 'FAILED'}")
        for r in gate["reasons"]:
            lines.append(f"  - {r}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return "-"
    return f"{v:.4f}" if math.isfinite(v) and v < 1e5 else f"{v:.3g}"
