"""Quality of GGUF files measured by llama.cpp itself (`pizoo eval FILE.gguf --backend llama.cpp`).

A GGUF is run in the runtime its users run: llama.cpp through llama-cpp-python (the `pizoo[quant]`
extra), with logits for every position. At each context length L the documents are cut into
disjoint windows of L tokens, each starting on the previous window's last token, so every token
after a document's first is scored once, with up to L - 1 tokens of context (pizoo's torch backend
gives the same perplexity with `--stride` equal to the window). Per scored token:

- perplexity: exp(mean negative log-likelihood of the next token);
- with a reference (the f16/bf16 file): KL(p_ref || p_file) over the whole vocabulary, its mean,
  and top-1 agreement (the two argmaxes are the same token), as llama.cpp's `perplexity
  --kl-divergence` reports them ("Mean KLD", "Same top p"), and the ppl ratio;
- the file's size and bits per weight (tensor bytes x 8 / elements).

The reference and every file see the same tokens (tokenized once by llama.cpp's tokenizer of the
reference, or of the first file). Windows are the outer loop and files the inner one, so the
reference's log-probabilities of one window are computed once for a whole ladder and only one
window's worth is ever held.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import PizooError

BACKEND = "llama.cpp"
DEFAULT_MAX_DOCUMENTS = 4
ROW_CHUNK = 256  # rows of logits turned into probabilities at a time (bounds the float64 scratch)


@dataclass
class _Tally:
    """Running sums over scored tokens for one file at one length."""

    tokens: int = 0
    nll: float = 0.0
    kld: float = 0.0
    kld_max: float = 0.0
    same_top1: int = 0
    ref_nll: float = 0.0
    kld_values: list[np.ndarray] = field(default_factory=list)

    def result(self, ctx: int, with_reference: bool) -> dict[str, Any]:
        n = max(self.tokens, 1)
        out: dict[str, Any] = {"ctx": ctx, "tokens": self.tokens, "ppl": math.exp(self.nll / n)}
        if with_reference:
            kl = np.concatenate(self.kld_values) if self.kld_values else np.zeros(1)
            out.update(kld=self.kld / n, kld_p99=float(np.quantile(kl, 0.99)), kld_max=self.kld_max,
                       top1=self.same_top1 / n, ref_ppl=math.exp(self.ref_nll / n),
                       ppl_ratio=math.exp((self.nll - self.ref_nll) / n))
        return out


def _llama_cpp():
    from ..export.quantize import _llama_cpp as load

    return load()


def _open(path: Path, n_ctx: int, n_threads: int):
    lc = _llama_cpp()
    try:
        return lc.Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                        logits_all=True, n_threads=n_threads,
                        n_threads_batch=n_threads, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise PizooError(f"{path}: llama.cpp cannot load it ({str(e).splitlines()[0] if str(e) else e}); "
                         "check the file with `pizoo inspect`") from None


class _Vocabulary:
    """llama.cpp's tokenizer of a GGUF: the model loaded vocabulary-only, with no llama_context.

    llama.cpp fills the hyperparameters (n_ctx_train among them) only when it loads the weights, so a
    context made over a vocabulary-only model is sized against n_ctx_train = 0 and warns "n_ctx_seq >
    n_ctx_train (0)" although the file's context_length is right. Tokenizing needs no context."""

    def __init__(self, path: Path) -> None:
        from ..export.quantize import _LogCapture

        self.lc = lc = _llama_cpp()
        params = lc.llama_model_default_params()
        params.vocab_only = True
        lc.llama_backend_init()
        with _LogCapture(lc) as log:  # llama.cpp's loader chatter stays off the terminal
            self.model = lc.llama_model_load_from_file(os.fsencode(path), params)
        if not self.model:
            raise PizooError(f"{path}: llama.cpp cannot load its vocabulary ({log.error()}); "
                             "check the file with `pizoo inspect`")
        self.vocab = lc.llama_model_get_vocab(self.model)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS/EOS where the file asks for them (llama.cpp's add_special)."""
        raw = text.encode("utf-8")
        need = -self.lc.llama_tokenize(self.vocab, raw, len(raw), None, 0, True, False)  # -(count) when short
        if need <= 0:
            return []
        ids = (self.lc.llama_token * need)()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), ids, need, True, False)
        if n < 0:
            raise PizooError(f"llama.cpp could not tokenize a document of {len(raw)} bytes")
        return list(ids[:n])

    def close(self) -> None:
        if self.model:
            self.lc.llama_model_free(self.model)
            self.model = None


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def window_starts(n_tokens: int, ctx: int) -> list[int]:
    """Disjoint windows: each starts on the previous one's last token; the last may be shorter."""
    return list(range(0, max(n_tokens - 1, 0), ctx - 1))


def _window_logits(path: Path, tokens: Sequence[int], n_ctx: int, n_threads: int) -> np.ndarray:
    llm = _open(path, n_ctx, n_threads)
    try:
        llm.reset()
        llm.eval(list(tokens))
        return np.array(llm.scores[:len(tokens) - 1], dtype=np.float32)  # rows that predict tokens[1:]
    finally:
        llm.close()


def _score(tally: _Tally, logits: np.ndarray, targets: np.ndarray, ref_logp: np.ndarray | None,
           ref_nll: np.ndarray | None) -> None:
    for r0 in range(0, len(targets), ROW_CHUNK):
        # Rounded to float32 like the reference's: identical logits give a divergence of exactly 0.
        logp = _log_softmax(logits[r0:r0 + ROW_CHUNK]).astype(np.float32).astype(np.float64)
        t = targets[r0:r0 + ROW_CHUNK]
        tally.nll -= float(logp[np.arange(len(t)), t].sum())
        if ref_logp is not None:
            ref = ref_logp[r0:r0 + ROW_CHUNK].astype(np.float64)
            kl = (np.exp(ref) * (ref - logp)).sum(axis=1)
            kl = np.maximum(kl, 0.0)  # rounding can make a zero divergence -1e-17
            tally.kld += float(kl.sum())
            tally.kld_max = max(tally.kld_max, float(kl.max(initial=0.0)))
            tally.kld_values.append(kl.astype(np.float32))
            tally.same_top1 += int((ref.argmax(axis=1) == logp.argmax(axis=1)).sum())
            tally.ref_nll += float(ref_nll[r0:r0 + ROW_CHUNK].sum())
    tally.tokens += len(targets)


def tokenize_documents(model: Path, data, split: str, min_tokens: int, doc_tokens: int,
                       max_documents: int | None) -> tuple[list[list[int]], list[str]]:
    """Documents with >= min_tokens tokens (llama.cpp's tokenizer of `model`, BOS as the file asks),
    truncated to doc_tokens; at most max_documents of them. Returns (token lists, document ids)."""
    from ..data import describe_sources, iter_documents

    vocab = _Vocabulary(model)
    docs, ids, read, longest = [], [], 0, 0
    try:
        for doc in iter_documents(data, split=split):
            read += 1
            toks = vocab.tokenize(doc.text)
            longest = max(longest, len(toks))
            if len(toks) >= min_tokens:
                docs.append(toks[:doc_tokens])
                ids.append(doc.id)
                if max_documents is not None and len(docs) >= max_documents:
                    break
    finally:
        vocab.close()
    if read == 0:
        raise PizooError(f"--data {', '.join(describe_sources(data))}: no {split} documents")
    if not docs:
        raise PizooError(f"no document has at least {min_tokens} tokens (the longest of {read} has {longest}); "
                         "use a smaller --ctx or longer documents (--data)")
    return docs, ids


def file_facts(path: Path) -> dict[str, Any]:
    from ..export.gguf import describe_gguf
    from ..export.quantize import bits_per_weight

    info = describe_gguf(path)
    return {"file": path.name, "path": str(path), "type": info["dtype"], "bytes": path.stat().st_size,
            "bpw": bits_per_weight(path), "context_length": info["context_length"]}


def evaluate_ggufs(files: Sequence[str | os.PathLike], *, ctx: Sequence[int] | None = None,
                   reference: str | os.PathLike | None = None, data=None, split: str = "heldout",
                   max_documents: int | None = DEFAULT_MAX_DOCUMENTS, doc_tokens: int | None = None,
                   n_threads: int | None = None,
                   echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure each GGUF in llama.cpp at the lengths `ctx` (default: the file's context length);
    with `reference`, the KL divergence and top-1 agreement against it. One report per file."""
    from ..export.quantize import all_cores

    paths = [Path(f) for f in files]
    ref = Path(reference) if reference is not None else None
    for p in paths + ([ref] if ref else []):
        if not p.is_file():
            raise PizooError(f"{p}: no such GGUF file")
    facts = [file_facts(p) for p in paths]
    lengths = sorted(set(int(c) for c in ctx)) if ctx else [int(facts[0]["context_length"])]
    if any(c < 2 for c in lengths):
        raise PizooError(f"--ctx {','.join(map(str, lengths))}: each length must be at least 2 tokens")
    threads = n_threads or all_cores()
    echo = echo or (lambda _m: None)
    tok_model = ref or paths[0]
    doc_tokens = doc_tokens or max(lengths)
    docs, doc_ids = tokenize_documents(tok_model, data, split, min_tokens=min(doc_tokens, max(lengths)),
                                       doc_tokens=doc_tokens, max_documents=max_documents)
    results: list[list[dict[str, Any]]] = [[] for _ in paths]
    for length in lengths:
        tallies = [_Tally() for _ in paths]
        windows = [(d, s) for d, toks in enumerate(docs) for s in window_starts(len(toks), length)]
        for w, (d, s) in enumerate(windows, start=1):
            window = docs[d][s:s + length]
            targets = np.asarray(window[1:], dtype=np.int64)
            ref_logp = ref_nll = None
            if ref is not None:
                ref_logits = _window_logits(ref, window, length, threads)
                ref_logp = np.concatenate([_log_softmax(ref_logits[r:r + ROW_CHUNK]).astype(np.float32)
                                           for r in range(0, len(targets), ROW_CHUNK)])
                ref_nll = -ref_logp[np.arange(len(targets)), targets].astype(np.float64)
                del ref_logits
            for i, p in enumerate(paths):
                _score(tallies[i], _window_logits(p, window, length, threads), targets, ref_logp, ref_nll)
            echo(f"llama.cpp ctx {length}: window {w}/{len(windows)}")
        for i in range(len(paths)):
            results[i].append(tallies[i].result(length, ref is not None))
    return [{"backend": BACKEND, **facts[i], "reference": str(ref) if ref else None,
             "documents": doc_ids, "results": results[i]} for i in range(len(paths))]


def ladder_summary(report: dict[str, Any]) -> dict[str, Any]:
    """{file: {ppl, kld, top1, bpw}} at the report's length: the figures run.json keeps."""
    out = {}
    for rep in report.get("files") or []:
        r = rep["results"][-1]
        out[rep["file"]] = {k: r.get(k) for k in ("ppl", "kld", "top1") if r.get(k) is not None}
        out[rep["file"]]["bpw"] = round(float(rep["bpw"]), 3)
    return out


def card_rows(report: dict[str, Any], repo_names: dict[str, str]) -> list[dict[str, Any]]:
    """The card's rows from a ladder report (OUT/gguf/quality.json): each uploaded file at the
    longest measured length, named as in the repo (`repo_names`: local file name -> path in repo)."""
    rows = []
    ref = report.get("reference")
    for rep in report.get("files") or []:
        if rep.get("file") not in repo_names or not rep.get("results"):
            continue
        r = max(rep["results"], key=lambda x: x["ctx"])
        rows.append({"file": repo_names[rep["file"]], "bytes": rep["bytes"], "bpw": rep["bpw"], "ctx": r["ctx"],
                     "ppl": r["ppl"], "kld": r.get("kld"), "top1": r.get("top1"),
                     "reference": repo_names.get(ref) if ref else None})
    return rows


def format_gguf_reports(reports: Sequence[dict[str, Any]]) -> str:
    """A table: one row per file and length."""
    with_ref = any(r.get("reference") for r in reports)
    head = ["file", "size", "bpw", "ctx", "ppl"] + (["KLD", "top-1", "ppl ratio"] if with_ref else [])
    rows = []
    for rep in reports:
        for r in rep["results"]:
            row = [rep["file"], f"{rep['bytes'] / 2**20:.1f} MiB", f"{rep['bpw']:.2f}", str(r["ctx"]), f"{r['ppl']:.4f}"]
            if with_ref:
                row += [f"{r['kld']:.6f}", f"{100 * r['top1']:.2f}%", f"{r['ppl_ratio']:.4f}"]
            rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in rows])



def run_eval_command(model: Path, *, ctx: str | None, reference: Path | None, data, split: str,
                     max_documents: int | None, doc_tokens: int | None, out: Path | None, as_json: bool,
                     echo: Callable[[str], None], emit: Callable[[str], None]) -> dict[str, Any]:
    """`pizoo eval FILE.gguf --backend llama.cpp`: measure, write OUT/eval.json, print the table."""
    import json

    from ..options import parse_contexts
    from ..fsutil import atomic_write_json

    if model.suffix.lower() != ".gguf" or not model.is_file():
        raise PizooError(f"{model}: --backend llama.cpp measures a .gguf file; convert first "
                         "(pizoo convert MODEL --to gguf) or use --backend pizoo")
    reports = evaluate_ggufs([model], ctx=parse_contexts(ctx), reference=reference, data=data, split=split,
                             max_documents=max_documents if max_documents is not None else DEFAULT_MAX_DOCUMENTS,
                             doc_tokens=doc_tokens, echo=echo)
    report = {"backend": BACKEND, "reference": str(reference) if reference else None, "files": reports}
    out = out or Path("pizoo-eval") / model.stem
    atomic_write_json(out / "eval.json", report)
    if as_json:
        emit(json.dumps(report, indent=2))
    else:
        emit(format_gguf_reports(reports))
        emit(f"\nwrote {out / 'eval.json'}")
    return report
