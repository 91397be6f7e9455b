"""Passkey retrieval.

Passkey retrieval uses the paper's prompt verbatim (task, filler, "The pass key is K. Remember it.
K is the pass key.", filler, "What is the pass key? The pass key is"), lines joined by newlines as
in the landmark-attention code the paper follows. A trial at distance d is a prompt of at most d
tokens (with the answer) whose key sits right after the task description, so the model must look
back about d tokens; distances are spread evenly over the window, `trials` random 5-digit keys
each (seeded). Two ways to score a trial (`mode`):
- "greedy" (default): retrieved iff greedy decoding emits the key's tokens. It is checked in one
  forward pass over prompt + key: at every key position the argmax must be the key's token, which
  is exactly what greedy decoding would produce, without a pass per digit.
- "generate": the same verdict by real greedy decoding with the KV cache (`pizoo.eval.generate`):
  the first len(key) tokens generated must be the key's. It equals "greedy" trial for trial (a
  test checks it) and shows that the generation path itself retrieves.
- "loglik": the exact-match likelihood p(key | prompt) = exp(sum of the key tokens' log-probs), the
  probability that sampling at temperature 1 reproduces the key; accuracy is its mean over trials.
The effective context k_max is the paper's: the largest distance k such that every tested
distance k' <= k has accuracy >= 20%.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..errors import PizooError
from .batching import auto_batch_size, model_device, run_batches
from .text import TextEncoder

PASSKEY_THRESHOLD = 0.2  # the paper's k_max success rate
PASSKEY_MODES = ("greedy", "loglik", "generate")

# The passkey prompt of the PI paper (after Mohtashami & Jaggi, landmark attention), verbatim.
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


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
    if mode == "generate":
        return _generate_passkey_trials(model, items, batch_tokens=batch_tokens, progress=progress, desc=desc)
    device = model_device(model)
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
        run_batches(list(enumerate(items)), lambda it: it[1].length,
                     lambda n: auto_batch_size(model, n, batch_tokens), run, desc)
    finally:
        bar.close()
    return [float(s) for s in scores]


def _generate_passkey_trials(model, items: Sequence[PasskeyTrial], *, batch_tokens: int | None,
                             progress: bool, desc: str) -> list[float]:
    """1.0 where greedy decoding (KV cache) writes the key's tokens first, else 0.0."""
    from tqdm.auto import tqdm

    from .generate import greedy_generate

    scores: list[float] = [0.0] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="trial", disable=not progress, leave=False)

    def run(batch: list[tuple[int, PasskeyTrial]]) -> None:
        longest = max(len(t.answer_ids) for _, t in batch)
        out = greedy_generate(model, [t.prompt_ids for _, t in batch], longest)
        for (i, t), tokens in zip(batch, out):
            scores[i] = float(tokens[:len(t.answer_ids)] == t.answer_ids)
        bar.update(len(batch))

    try:
        run_batches(list(enumerate(items)), lambda it: len(it[1].prompt_ids),
                    lambda n: auto_batch_size(model, n, batch_tokens), run, desc)
    finally:
        bar.close()
    return scores


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
