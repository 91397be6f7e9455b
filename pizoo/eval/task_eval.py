"""Running the long-context tasks: build a task's samples at a length, let the model answer them by
greedy generation, score each output by string match (see `pizoo.eval.tasks`).

Samples whose prompts have the same number of tokens share a forward pass. Generation stops at an
end-of-sequence token, after the task's budget, or as soon as the output contains every answer:
recall can only grow with more text, so stopping there never changes a score.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from .batching import auto_batch_size, run_batches
from .generate import greedy_generate
from .tasks import TASKS, HaystackText, Sample, build_samples, effective_length, mean, string_match_all
from .text import TextEncoder

# (prompts of equal length, max_new_tokens, done(row, tokens)) -> generated tokens per prompt
Generator = Callable[[list[list[int]], int, Callable[[int, list[int]], bool]], list[list[int]]]


def model_generator(model, stop_ids: Sequence[int] = ()) -> Generator:
    """Greedy decoding with pizoo's model (the KV cache), stopping at the model's end-of-sequence ids."""
    def generate(prompts, max_new_tokens, done):
        return greedy_generate(model, prompts, max_new_tokens, stop_ids=stop_ids, done=done)

    return generate


def stop_ids_of(config) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def answer_samples(generate: Generator, encoder: TextEncoder, samples: list[Sample], max_new_tokens: int, *,
                   batch_size: Callable[[int], int]) -> list[str]:
    """The decoded output for each sample, in order."""
    outputs: list[str | None] = [None] * len(samples)
    for s in samples:
        s.prompt_ids = encoder.prefix + encoder.plain(s.prompt)

    def run(batch: list[tuple[int, Sample]]) -> None:
        def done(row: int, tokens: list[int]) -> bool:
            return string_match_all(encoder.tokenizer.decode(tokens), batch[row][1].answers) == 1.0

        generated = generate([s.prompt_ids for _, s in batch], max_new_tokens, done)
        for (i, _), tokens in zip(batch, generated):
            outputs[i] = encoder.tokenizer.decode(tokens)

    run_batches(list(enumerate(samples)), lambda it: len(it[1].prompt_ids), batch_size, run,
                f"task {samples[0].task} at {samples[0].length}" if samples else "tasks")
    return [o or "" for o in outputs]


def measure_task(generate: Generator, encoder: TextEncoder, name: str, length: int, *, samples: int, seed: int,
                 text: HaystackText, batch_size: Callable[[int], int]) -> dict[str, Any]:
    """One task at one length: {task, length, score, samples, scores, prompt_tokens, seconds} or
    {task, length, skipped: reason} when no prompt fits the length."""
    start = time.perf_counter()
    built = build_samples(name, length, samples, seed, text, lambda p: len(encoder.prefix) + len(encoder.plain(p)))
    if isinstance(built, str):
        return {"task": name, "length": length, "skipped": built}
    outputs = answer_samples(generate, encoder, built, TASKS[name].max_new_tokens, batch_size=batch_size)
    scores = [string_match_all(o, s.answers) for o, s in zip(outputs, built)]
    return {"task": name, "length": length, "score": mean(scores), "samples": len(scores), "scores": scores,
            "prompt_tokens": mean([len(s.prompt_ids) for s in built]),
            "example": {"answers": built[0].answers, "output": outputs[0][:200]},
            "seconds": round(time.perf_counter() - start, 3)}


def model_batch_size(model, batch_tokens: int | None) -> Callable[[int], int]:
    return lambda n: auto_batch_size(model, n, batch_tokens)


def summarize(results: list[dict[str, Any]], names: list[str], threshold: float) -> dict[str, Any]:
    """eval.json's `tasks` block: per task its score at each length and its effective length; the
    average over the tasks at each length where all of them ran, and its effective length."""
    tasks: dict[str, Any] = {}
    for name in names:
        mine = [r for r in results if r["task"] == name and "score" in r]
        scores = {r["length"]: r["score"] for r in mine}
        tasks[name] = {"scores": {str(k): v for k, v in sorted(scores.items())},
                       "samples": {str(r["length"]): r["samples"] for r in mine},
                       "effective_length": effective_length(scores, threshold)}
    lengths = sorted({r["length"] for r in results})
    average = {L: mean([tasks[n]["scores"][str(L)] for n in names]) for L in lengths
               if all(str(L) in tasks[n]["scores"] for n in names)}
    return {"threshold": threshold, "lengths": lengths, "tasks": tasks,
            "average": {str(k): v for k, v in average.items()},
            "effective_length": effective_length(average, threshold) if average else None,
            "skipped": [r["skipped"] for r in results if "skipped" in r]}
