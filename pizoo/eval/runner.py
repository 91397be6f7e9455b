"""`evaluate_model`: perplexity, passkey and the baseline measured on the same documents, the gate
applied, eval.json written. Each measurement lives in its own module; this one puts them together.
"""

from __future__ import annotations

import gc
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ..errors import PizooError
from ..options import parse_contexts  # noqa: F401  (re-exported by pizoo.eval)
from ..recipes import GateThresholds
from .batching import auto_batch_size, resolve_device, resolve_dtype
from .cache import EvalCache, model_fingerprint
from .gate import apply_gate, raise_if_failed, thresholds_from, validate_thresholds
from .passkey import PASSKEY_MODES, PasskeyResult, passkey_min_length, passkey_retrieval, spread_passkey_distances
from .perplexity import DEFAULT_STRIDE, sliding_window_perplexity
from .report import check_report_folder, write_report
from .generate import greedy_generate
from .task_eval import measure_task, stop_ids_of, summarize
from .tasks import TASK_THRESHOLD, TASKS_VERSION, HaystackText, parse_tasks
from .text import TextEncoder, tokens_fingerprint

Echo = Callable[[str], None]
BASELINE_CTX = ("original", "all", "listed")


def _quiet(_: str) -> None:
    pass


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
        from ..config import ModelConfig

        return ModelConfig.from_file(self.path / "config.json")

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = TextEncoder(self.path)
        return self._encoder

    @property
    def model(self):
        if self._model is None:
            from ..model import load_model

            self._model = load_model(self.path, device=self.device, dtype=self.dtype)
        return self._model

    def release(self) -> None:
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


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
    from ..fsutil import read_json

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


PROTOCOL_WHOLE = "whole"  # one context: every document scored whole with sliding windows (HF's guide)
PROTOCOL_SAME_TOKENS = "same-tokens"  # several: the same tokens at every length (PI/YaRN)


@dataclass
class _Corpus:
    texts: list[tuple[str, str]]  # (id, text) of the selected documents
    tokens: list[torch.Tensor]
    fingerprint: str  # over the ids and texts read
    read: int
    longest: int
    protocol: str = PROTOCOL_SAME_TOKENS
    min_tokens: int = 2  # documents shorter than this were left out
    doc_tokens: int | None = None  # each document cut to this many tokens (None: whole)


def _read_documents(encoder: TextEncoder, data, split: str,
                    enough: tuple[int, int] | None = None) -> tuple[list[tuple[str, str, list[int]]], str]:
    """The split's documents, tokenized: ([(id, text, tokens)], fingerprint over the ids and texts read).
    enough=(length, count): stop once `count` documents have at least `length` tokens (--max-docs:
    every selection then lies within what was read, so a large corpus is not read to its end)."""
    from ..data import describe_sources, fingerprint_update, iter_documents

    h = hashlib.sha256()
    docs = []
    reaching = 0
    for doc in iter_documents(data, split=split):
        fingerprint_update(h, doc)  # the same fingerprint as data_fingerprint over the documents read
        docs.append((doc.id, doc.text, encoder.document(doc.text)))
        if enough is not None and len(docs[-1][2]) >= enough[0]:
            reaching += 1
            if reaching >= enough[1]:
                break
    if not docs:
        raise PizooError(f"--data {', '.join(describe_sources(data))}: no {split} documents")
    return docs, h.hexdigest()


def _select_documents(docs: list[tuple[str, str, list[int]]], fingerprint: str, *, protocol: str, min_tokens: int,
                      doc_tokens: int | None, max_documents: int | None) -> _Corpus:
    """The documents with >= min_tokens tokens, cut to doc_tokens (None: whole), at most max_documents."""
    texts, tokens = [], []
    for doc_id, text, ids in docs:
        if len(ids) >= min_tokens:
            texts.append((doc_id, text))
            tokens.append(torch.tensor(ids[:doc_tokens] if doc_tokens else ids, dtype=torch.long))
            if max_documents is not None and len(tokens) >= max_documents:
                break
    longest = max(len(ids) for _, _, ids in docs)
    if not tokens:
        raise PizooError(f"no document has at least {min_tokens} tokens (the longest of {len(docs)} has {longest}); "
                         "use a smaller --ctx or longer documents (--data)")
    return _Corpus(texts, tokens, fingerprint, len(docs), longest, protocol, min_tokens, doc_tokens)


def default_split(model_folder: Path | None, data) -> tuple[str, str | None]:
    """The split `pizoo eval` scores when --split is not given, and a note saying why.

    The held-out split (documents calibration never saw) only where a model could have trained on
    the data: the default corpus, or the model's own calibration data (calibration.json records its
    train-split fingerprint). Data given for evaluation is scored whole (all)."""
    from ..data import as_spec, data_fingerprint
    from ..fsutil import read_json

    if as_spec(data).sources is None:
        return "heldout", None
    cal = Path(model_folder) / "calibration.json" if model_folder is not None else None
    recorded = None
    if cal is not None and cal.is_file():
        recorded = ((read_json(cal, "calibration.json").get("data") or {}).get("fingerprint"))
    if recorded and data_fingerprint(data, "train") == recorded:
        return "heldout", ("the data is this model's calibration data (calibration.json): scoring its held-out "
                           "documents; --split all scores everything")
    return "all", None


def _measure_ppl(subject: _Subject, tokens: list[torch.Tensor], token_fp: str, ctx: int, stride: int,
                 cache: EvalCache, batch_tokens: int | None, progress: bool, whole: bool = False) -> dict[str, Any]:
    key = cache.key(kind="ppl", model=subject.fingerprint, tokens=token_fp, ctx=ctx, stride=stride,
                    device=subject.device.type, dtype=str(subject.dtype), **({"whole": True} if whole else {}))
    hit = cache.get(key)
    if hit is not None:
        return {**hit, "cached": True}
    res = sliding_window_perplexity(subject.model, tokens, ctx, stride, batch_tokens=batch_tokens,
                                    progress=progress, min_tokens=2 if whole else None).to_json()
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



class _Log:
    """Notes and warnings: shown as they happen (echo) and kept for eval.json."""

    def __init__(self, echo: Echo | None):
        self.echo = echo or _quiet
        self.notes: list[str] = []
        self.warnings: list[str] = []

    def note(self, msg: str) -> None:
        if msg in self.notes:  # each note once, however many places reach it
            return
        self.notes.append(msg)
        self.echo(f"note: {msg}")

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self.echo(f"warning: {msg}")


def _open_subject(spec: str | Path, full_hash: bool, device: torch.device, dtype: torch.dtype,
                  what: str = "model") -> tuple[_Subject, Any, str]:
    """Resolve and validate a model (config and weights) before any long work; (subject, cfg, source)."""
    from ..checkpoint import open_checkpoint
    from ..resolve import resolve_model

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
                      contexts: list[int], original: int, *, stride: int, which: str, store: EvalCache,
                      batch_tokens: int | None, progress: bool, log: _Log,
                      tasks: "_TaskPlan | None" = None) -> dict[str, Any]:
    """The base model's perplexity on the same documents: at its original context (the gate's
    reference) and at every shorter requested context (which="original"), at every requested one
    ("all"), or only at the requested ones up to its original context ("listed"); and the tasks at
    the requested contexts up to its original one (the lengths it supports)."""
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
        limit = corpus.doc_tokens
        tokens = [torch.tensor(base.encoder.document(t)[:limit], dtype=torch.long) for _, t in corpus.texts]
        fp = tokens_fingerprint(tokens)
    ctxs = sorted(({base_context} if which != "listed" else set())
                  | {c for c in contexts if which == "all" or c <= base_context})
    results = []
    for c in ctxs:
        r = _measure_ppl(base, tokens, fp, c, min(stride, c), store, batch_tokens, progress,
                         whole=corpus.protocol == PROTOCOL_WHOLE)
        r["extrapolation"] = c > base_cfg.context_length
        results.append(r)
        log.echo(f"baseline ppl @ {c}: {r['ppl']:.4f}{' (cached)' if r['cached'] else ''}")
    tasks_report = None
    if tasks is not None:
        supported = [c for c in contexts if c <= base_context]
        if supported:
            tasks_report = _measure_tasks(base, tasks, supported, store, batch_tokens, log, who="baseline ")
        else:
            log.note(f"baseline: no task length is within its original context ({base_context}); tasks not run")
    base.release()
    return {"model": {"path": str(base.path), "spec": base.spec, "hash": base.fingerprint},
            "original_context": base_context,
            "ppl_at_original": next((r["ppl"] for r in results if r["ctx"] == base_context), None),
            "results": results,
            "tasks": tasks_report}


@dataclass
class _TaskPlan:
    """The long-context tasks to run, with the evaluation text as their haystack."""

    names: list[str]
    samples: int
    seed: int
    corpus: _Corpus

    def __post_init__(self):
        self.text = HaystackText(" ".join(t for _, t in self.corpus.texts))


def _measure_tasks(subject: _Subject, plan: _TaskPlan, lengths: list[int], store: EvalCache,
                   batch_tokens: int | None, log: _Log, who: str = "") -> dict[str, Any]:
    """Every task at every length (cached one by one), summarised for eval.json."""
    stops = stop_ids_of(subject.config)

    def generate(prompts, max_new_tokens, done):  # loads the model only when something is not cached
        return greedy_generate(subject.model, prompts, max_new_tokens, stop_ids=stops, done=done)

    def batch_size(n: int) -> int:
        return auto_batch_size(subject.model, n, batch_tokens)

    runs = []
    for name in plan.names:
        for length in lengths:
            key = store.key(kind="task", version=TASKS_VERSION, model=subject.fingerprint, task=name, length=length,
                            samples=plan.samples, seed=plan.seed, text=plan.corpus.fingerprint,
                            device=subject.device.type, dtype=str(subject.dtype))
            hit = store.get(key)
            if hit is None:
                hit = measure_task(generate, subject.encoder, name, length, samples=plan.samples, seed=plan.seed,
                                   text=plan.text, batch_size=batch_size)
                store.put(key, hit)
                cached = False
            else:
                cached = True
            runs.append({**hit, "cached": cached})
            if "skipped" in hit:
                log.note(f"{who}task {hit['skipped']}")
            else:
                log.echo(f"{who}task {name} @ {length}: {hit['score']:.2f}{' (cached)' if cached else ''}")
    summary = summarize(runs, plan.names, TASK_THRESHOLD)
    return {**summary, "samples": plan.samples, "seed": plan.seed, "runs": runs}


@dataclass
class _ContextPlan:
    contexts: list[int]  # measured
    gate_skips: dict[int, str]  # gate contexts the data cannot support -> why (skipped gate checks)
    baseline_skipped: str | None = None  # why the baseline's perplexity is not measured


def _plan_contexts(requested: list[int], docs: list[tuple[str, str, list[int]]], split: str, *, target: int,
                   original: int, gate_on: bool, base_context: int | None, log: _Log) -> _ContextPlan:
    """Which lengths to measure: the requested ones the documents reach, and the gate's (the model's
    original and target context) when a document is that long; what is left out is said once."""
    longest = max(len(ids) for _, _, ids in docs)
    where = f"the longest {'' if split == 'all' else split + ' '}document of {len(docs)} has {longest} tokens"
    measured = list(requested)
    if len(requested) > 1:  # several lengths share the same tokens: a length no document reaches is left out
        too_long = [c for c in requested if c > longest]
        if len(too_long) == len(requested):
            raise PizooError(f"no document reaches any of the lengths {', '.join(map(str, requested))} ({where}); "
                             "pass a smaller --ctx, one --ctx (documents are then scored whole), or longer documents "
                             "(--data)")
        if too_long:
            log.note(f"ctx {', '.join(map(str, too_long))} not measured: {where}")
            measured = [c for c in requested if c <= longest]
    gate_skips: dict[int, str] = {}
    if gate_on:
        wanted = [c for c in sorted({original, target}) if c not in measured]
        gate_skips = {c: f"ctx {c} not measured: {where}" for c in wanted if c > longest}
        added = [c for c in wanted if c not in gate_skips]
        if added:
            measured += added
            log.note(f"the gate also measures ctx {', '.join(map(str, added))} (the model's original/target "
                     "context); --no-gate measures only the listed lengths")
        if gate_skips:
            log.note(f"the gate's ctx {', '.join(map(str, gate_skips))} not measured ({where}): those gate checks "
                     "are reported as skipped")
    baseline_skipped = None
    if base_context is not None and base_context > longest:
        baseline_skipped = f"the baseline's original context {base_context} is not measured: {where}"
        log.note(f"{baseline_skipped}; the gate's perplexity checks are skipped")
    return _ContextPlan(sorted(set(measured)), gate_skips, baseline_skipped)


def _protocol_line(corpus: _Corpus, split: str, ctx: int, stride: int) -> str:
    """How the documents are scored, for the log and the report."""
    n, tokens = len(corpus.tokens), sum(len(t) for t in corpus.tokens)
    which = "" if split == "all" else f"{split} "
    if corpus.protocol == PROTOCOL_WHOLE:
        cut = f", each cut to its first {corpus.doc_tokens} tokens" if corpus.doc_tokens else ""
        return (f"{n} of {corpus.read} {which}documents scored whole ({tokens} tokens{cut}) with windows of "
                f"{ctx} tokens moving by {min(stride, ctx)}")
    return (f"{n} of {corpus.read} {which}documents have >= {corpus.min_tokens} tokens; the same first "
            f"{corpus.doc_tokens} tokens of each are scored at every length (the PI/YaRN protocol)")


def _check_arguments(*, stride: int, passkey_mode: str, baseline_ctx: str, max_documents: int | None,
                     doc_tokens: int | None, batch_tokens: int | None) -> None:
    if passkey_mode not in PASSKEY_MODES:
        raise PizooError(f"--passkey-mode {passkey_mode}: use one of {', '.join(PASSKEY_MODES)}")
    if baseline_ctx not in BASELINE_CTX:
        raise PizooError(f"--baseline-ctx {baseline_ctx}: use one of {', '.join(BASELINE_CTX)}")
    if stride < 1:
        raise PizooError(f"--stride {stride}: must be at least 1")
    if max_documents is not None and max_documents < 1:
        raise PizooError(f"--max-docs {max_documents}: must be at least 1")
    if doc_tokens is not None and doc_tokens < 2:
        raise PizooError(f"--doc-tokens {doc_tokens}: must be at least 2")
    if batch_tokens is not None and batch_tokens < 1:  # 0 used to mean the default silently
        raise PizooError(f"--batch-tokens {batch_tokens}: must be at least 1 (leave it out for the default)")


def evaluate_model(model: str | Path, *, ctx: int | str | Iterable[int] | None = None, data=None,
                   split: str | None = None, stride: int = DEFAULT_STRIDE, passkey: bool = True,
                   baseline: str | Path | bool | None = None, gate: GateThresholds | Mapping | bool | None = None,
                   out: str | Path | None = None, passkey_mode: str = "greedy", passkey_trials: int = 10,
                   passkey_distances: int = 32, passkey_window: int | None = None, seed: int = 0,
                   max_documents: int | None = None, doc_tokens: int | None = None,
                   baseline_ctx: str = "original", device: str | None = None, dtype: str | None = None,
                   batch_tokens: int | None = None, cache: bool = True, full_hash: bool = False,
                   plot: bool = True, progress: bool = True, raise_on_fail: bool = False,
                   tasks: str | Iterable[str] | None = None, task_samples: int = 5,
                   echo: Echo | None = None) -> dict[str, Any]:
    """Evaluate a model and apply the gate; the one library entry point. Returns the eval.json dict.

    model: HF folder, .gguf file (imported), zoo name or Hub id. ctx: lengths (default: the
    original context, its doublings, the target); with the gate on, the original and target
    contexts are measured too when a document is that long (else the gate reports those checks as
    skipped, with the reason), and a requested length longer than every document is left out with
    a note. data: anything `pizoo.data.as_spec` takes (None: the default offline corpus). split
    (None: `default_split`): heldout for the default corpus and the model's own calibration data,
    all for other data. One measured length scores every document whole with sliding windows (HF's
    perplexity guide; a document shorter than the window is one window); several score the same
    tokens at every length (PI/YaRN): the documents with at least max(ctx) tokens, truncated to
    doc_tokens (default max(ctx)). At most max_documents documents are scored. baseline: a model spec, None to find the base of a calibrated model
    (calibration.json / config.json pizoo.base_model), False for none; it is measured at its
    original context and the shorter ctx (baseline_ctx="all": at every ctx too; "listed": only at the
    ctx up to its original context, without the gate). gate: GateThresholds or a dict of its
    fields (None: defaults; False: no gate). passkey_window: the passkey window (default max(ctx)).
    out: folder for eval.json and ppl.png (None: nothing is written but the cache). echo: called
    with progress lines, notes and warnings. raise_on_fail: raise GateFailed (exit code 3) after
    writing the report when the gate fails. tasks: long-context tasks (`pizoo.eval.tasks`: names
    or the groups niah / ruler) run at every ctx with task_samples samples each; the baseline runs
    them at the ctx it supports (up to its original context). The gate's min_task_score adds its
    tasks.
    """
    from .. import __version__
    from ..data import as_spec, default_corpus_note, describe_sources

    _check_arguments(stride=stride, passkey_mode=passkey_mode, baseline_ctx=baseline_ctx,
                     max_documents=max_documents, doc_tokens=doc_tokens, batch_tokens=batch_tokens)
    if out is not None:
        check_report_folder(out)  # before any work, not after it
    log = _Log(echo)
    gate_on = gate is not False
    thresholds = thresholds_from(None if isinstance(gate, bool) else gate)
    validate_thresholds(thresholds)
    if gate_on and baseline_ctx == "listed":
        raise PizooError("--baseline-ctx listed: the gate needs the base at its original context; "
                         "use original or all, or --no-gate")
    task_names = parse_tasks(tasks)
    if gate_on and thresholds.min_task_score:
        added = [n for n in thresholds.min_task_score if n not in task_names]
        if added:
            task_names = parse_tasks(task_names + added)
            log.note(f"added task(s) {', '.join(added)} for the gate's min_task_score")
    if task_names and task_samples < 1:
        raise PizooError(f"--samples {task_samples}: must be at least 1 (samples per task and length)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    store = EvalCache(enabled=cache)

    subject, cfg, source = _open_subject(model, full_hash, dev, dt)
    target, original = cfg.context_length, cfg.original_context
    requested = parse_contexts(ctx) or default_contexts(original, target)

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

    if split is None:
        split, why = default_split(subject.path, data)
        if why:
            log.note(why)
    # With --max-docs, reading stops at that many documents long enough for every length wanted.
    wanted = max(requested + ([original, target] if gate_on else [])
                 + ([base_cfg.original_context] if base_cfg is not None and baseline_ctx != "listed" else []))
    docs, data_fp = _read_documents(subject.encoder, data, split,
                                    enough=(wanted, max_documents) if max_documents is not None else None)
    ctx_plan = _plan_contexts(requested, docs, split, target=target, original=original, gate_on=gate_on,
                          base_context=base_cfg.original_context if base_cfg is not None and baseline_ctx != "listed"
                          else None, log=log)
    contexts = ctx_plan.contexts
    if ctx_plan.baseline_skipped:
        base = base_cfg = None
    for c in contexts:
        if c > target:
            kind = f"'{cfg.rope.method}' scaling up to {target}" if cfg.rope.is_scaled else "no RoPE scaling"
            log.warn(f"ctx {c} is beyond the model's context of {target} ({kind}): this is extrapolation; "
                     "measuring it anyway (the papers' baseline)")

    window = passkey_window or max(contexts)
    if passkey:  # fail before the perplexity work if the passkey settings cannot run
        spread_passkey_distances(window, passkey_distances, passkey_min_length(subject.encoder))
        if passkey_trials < 1:
            raise PizooError(f"--passkey-trials {passkey_trials}: must be at least 1")

    whole = len(contexts) == 1
    if whole:  # one length: every document, whole, as HF's perplexity guide scores a text
        corpus = _select_documents(docs, data_fp, protocol=PROTOCOL_WHOLE, min_tokens=2, doc_tokens=doc_tokens,
                                   max_documents=max_documents)
    else:  # several: the same tokens at every length (PI/YaRN), the baseline's original context included
        longest_ctx = max(contexts + ([base_cfg.original_context] if base_cfg is not None and baseline_ctx != "listed"
                                      else []))
        doc_tokens = doc_tokens or longest_ctx
        if doc_tokens < longest_ctx:
            raise PizooError(f"--doc-tokens {doc_tokens}: must be at least the longest context measured "
                             f"({longest_ctx})")
        corpus = _select_documents(docs, data_fp, protocol=PROTOCOL_SAME_TOKENS, min_tokens=longest_ctx,
                                   doc_tokens=doc_tokens, max_documents=max_documents)
    del docs
    token_fp = tokens_fingerprint(corpus.tokens)
    log.echo(f"data: {_protocol_line(corpus, split, contexts[0], stride)}")
    if as_spec(data).sources is None:
        log.note(default_corpus_note().replace("a real calibration", "a real evaluation"))

    results = []
    for c in contexts:
        s = min(stride, c)
        if s != stride:
            log.note(f"ctx {c}: stride {stride} is longer than the window; using the disjoint mode (stride {c})")
        r = _measure_ppl(subject, corpus.tokens, token_fp, c, s, store, batch_tokens, progress, whole=whole)
        r["extrapolation"] = c > target
        results.append(r)
        short = (f"; {r['short_documents']} shorter than the window, each scored in one window"
                 if r.get("short_documents") else "")
        log.echo(f"ppl @ {c}: {r['ppl']:.4f} ({r['tokens']} tokens, {r['documents']} documents{short}"
                 f"{', cached' if r['cached'] else ''})")
    passkey_report = None
    if passkey:
        passkey_report = _measure_passkey(subject, window, passkey_distances, passkey_trials, seed, passkey_mode,
                                          store, batch_tokens, progress)
        log.echo(f"passkey @ {window}: k_max {passkey_report['k_max']}"
                 f"{' (cached)' if passkey_report['cached'] else ''}")
    plan = _TaskPlan(task_names, task_samples, seed, corpus) if task_names else None
    tasks_report = _measure_tasks(subject, plan, contexts, store, batch_tokens, log) if plan else None
    subject.release()  # free the model before the baseline is loaded

    baseline_report = None
    if base is not None:
        baseline_report = _measure_baseline(base, base_cfg, subject, corpus, token_fp, contexts, original,
                                            stride=stride, which=baseline_ctx, store=store,
                                            batch_tokens=batch_tokens, progress=progress, log=log, tasks=plan)
    gate_report = None
    if gate_on:
        gate_report = apply_gate(
            thresholds, ppl={r["ctx"]: r["ppl"] for r in results}, target=target, original=original,
            base_ppl=baseline_report["ppl_at_original"] if baseline_report else None,
            base_context=baseline_report["original_context"] if baseline_report else None,
            unmeasured=ctx_plan.gate_skips, baseline_reason=ctx_plan.baseline_skipped,
            passkey=PasskeyResult.from_json(passkey_report) if passkey_report else None, tasks=tasks_report)

    if store.unwritable:
        log.note(f"results not cached: {store.unwritable}")
    report: dict[str, Any] = {
        "pizoo_version": __version__,
        "model": {"path": str(subject.path), "spec": str(model), "source": source, "hash": subject.fingerprint,
                  "hash_mode": "full" if full_hash else "fast", "context_length": target,
                  "original_context": original, "rope": cfg.rope.describe()},
        "data": {"sources": describe_sources(data), "split": split, "fingerprint": corpus.fingerprint,
                 "documents_read": corpus.read, "documents": len(corpus.tokens), "longest_document": corpus.longest,
                 "doc_tokens": corpus.doc_tokens, "tokens_fingerprint": token_fp, "protocol": corpus.protocol,
                 "protocol_note": _protocol_line(corpus, split, contexts[0], stride)},
        "settings": {"stride": stride, "device": dev.type, "dtype": str(dt).removeprefix("torch."),
                     "passkey": passkey, "seed": seed, "tasks": task_names,
                     "task_samples": task_samples if task_names else None},
        "results": results,
        "passkey": passkey_report,
        "tasks": tasks_report,
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
