"""RULER-style synthetic long-context tasks (Hsieh et al. 2024, arXiv 2404.06654), built offline.

Each task makes prompts that fill a given length and knows their answers; the model continues each
prompt greedily (`pizoo.eval.generate`, with a KV cache) and a sample scores the fraction of its
answers found in the output, case-insensitive (RULER's string_match_all). A task's score at a
length is the mean over its samples, in [0, 1] (RULER reports x100).

The tasks follow RULER's definitions, templates and generation budgets (scripts/synthetic.yaml):
- niah_single_1/2/3: one needle "One of the special magic {numbers|uuids} for {key} is: {value}."
  in a noise haystack (the repeated grass/sky/sun sentences) or an essay haystack (the evaluation
  text); word keys, number (7 digits) or UUID values.
- niah_multikey_1/2/3: 4 keys with one asked (essay), or a haystack made only of distractor
  needles (word -> number, UUID -> UUID).
- niah_multivalue: 4 values for the asked key; niah_multiquery: 4 keys asked at once.
- vt: variable tracking, a chain "VAR A = 12345", "VAR B = VAR A", ... of 4 hops in noise; the
  answer is every variable holding the value (one worked example first, as RULER does).
- cwe: common words extraction, 10 words repeated 30x among words repeated 3x (6x / 1x below 4k
  tokens), one worked example first; the answer is the 10 common words.
- fwe: frequent words extraction, coded words drawn with Zipf exponent 2 (the most frequent is
  "..." as noise); the answer is the next three.
- passkey: the PI paper's passkey prompt filling the length (key at the start).

Word keys are adjective-noun pairs from the lists below (RULER draws them from wonderwords);
cwe's words are the evaluation text's own words (pseudo-words when it has too few). Every sample
comes from a seeded generator, so the same seed gives the same prompts on every machine.

A prompt fills `length - max_new_tokens` tokens at most (RULER counts the generation budget in the
length), with the most haystack that fits. The effective length is RULER's: the longest tested
length whose score stays at or above TASK_THRESHOLD at every tested length up to it. The
threshold, 0.856, is RULER's: Llama-2-7B's average at 4k, the quality a 4k-context model of that
size reaches at its own length.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from ..errors import PizooError

TASK_THRESHOLD = 0.856
TASKS_VERSION = "pizoo-tasks-v1"  # in the cache key: change it when a generator writes other prompts
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's 40 evenly spread needle depths (%)

ADJECTIVES = (
    "able", "ancient", "angry", "bitter", "black", "bold", "brave", "bright", "broad", "calm", "cheap", "clean",
    "clever", "cold", "cool", "crisp", "cruel", "curly", "damp", "dark", "deep", "dry", "dull", "eager", "early",
    "empty", "fair", "fancy", "fast", "fierce", "flat", "fresh", "gentle", "giant", "glad", "golden", "grand",
    "green", "happy", "hard", "heavy", "hollow", "honest", "huge", "humble", "icy", "jolly", "kind", "large",
    "lazy", "light", "little", "lively", "lonely", "loud", "lucky", "mellow", "merry", "mighty", "modern",
    "narrow", "neat", "noisy", "odd", "old", "pale", "plain", "polite", "proud", "quick", "quiet", "rapid",
    "rare", "rich", "rough", "round", "royal", "rusty", "sad", "sharp", "shiny", "short", "shy", "silent",
    "silver", "simple", "slow", "small", "smooth", "soft", "solid", "sour", "spicy", "steep", "stiff", "strong",
    "sweet", "swift", "tall", "tame", "tender", "thick", "thin", "tidy", "tiny", "tough", "vast", "warm",
    "weak", "wet", "whole", "wide", "wild", "wise", "young", "zealous",
)
NOUNS = (
    "anchor", "apple", "arrow", "badge", "basket", "beacon", "bell", "bench", "blanket", "bottle", "bridge",
    "bucket", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cedar", "chair", "cloud", "coast",
    "comet", "compass", "copper", "cottage", "crystal", "desert", "diamond", "dragon", "drum", "eagle", "engine",
    "falcon", "feather", "fence", "forest", "fountain", "garden", "glacier", "harbor", "helmet", "hill",
    "island", "jacket", "jungle", "kettle", "ladder", "lantern", "lemon", "library", "lighthouse", "meadow",
    "mirror", "monkey", "mountain", "needle", "ocean", "orchard", "otter", "painting", "palace", "parrot",
    "pebble", "pencil", "pepper", "piano", "pillow", "planet", "pocket", "pond", "puzzle", "quarry", "rabbit",
    "ribbon", "river", "rocket", "saddle", "sailor", "shadow", "shelter", "signal", "spider", "statue",
    "stone", "storm", "sunset", "table", "temple", "thunder", "tiger", "tower", "trumpet", "tunnel", "valley",
    "violin", "wagon", "walnut", "window", "wizard",
)

TEMPLATES = {
    "niah": ("Some special magic {type} are hidden within the following text. Make sure to memorize it. I will "
             "quiz you about the {type} afterwards.\n{context}\nWhat are all the special magic {type} for {query} "
             "mentioned in the provided text?",
             " The special magic {type} for {query} mentioned in the provided text are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
           "Question: Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
           "assigned the value {query}, they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
            "the dots '....'. What are the three most frequently appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:"),
}


@dataclass(frozen=True)
class Task:
    """One task: its kind (which generator), RULER's generation budget, and the generator's settings."""

    name: str
    kind: str  # niah | vt | cwe | fwe | passkey
    max_new_tokens: int
    settings: dict = field(default_factory=dict)


def _niah(name: str, haystack: str, key: str, value: str, keys: int = 1, values: int = 1, queries: int = 1) -> Task:
    return Task(name, "niah", 128, {"haystack": haystack, "key": key, "value": value, "keys": keys,
                                    "values": values, "queries": queries})


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("passkey", "passkey", 16),
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", keys=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", values=4),
    _niah("niah_multiquery", "essay", "words", "numbers", keys=4, queries=4),
    Task("vt", "vt", 30, {"chains": 1, "hops": 4}),
    Task("cwe", "cwe", 120, {"common": 10}),
    Task("fwe", "fwe", 50, {"alpha": 2.0}),
)}
GROUPS = {
    "niah": [n for n in TASKS if n.startswith("niah_")],
    "ruler": [n for n in TASKS if n != "passkey"],  # RULER's 13 tasks less the two QA ones (need datasets)
}


def parse_tasks(spec: str | Iterable[str] | None) -> list[str]:
    """'passkey,niah,vt' -> task names in a stable order (groups expanded, duplicates dropped)."""
    if spec is None:
        return []
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names: list[str] = []
    for item in filter(None, items):
        found = GROUPS.get(item) or ([item] if item in TASKS else None)
        if found is None:
            known = ", ".join(list(TASKS) + list(GROUPS))
            raise PizooError(f"--tasks: unknown task '{item}'; use some of: {known}")
        names += [n for n in found if n not in names]
    if not names:
        raise PizooError("--tasks: no task given; e.g. --tasks passkey,niah,vt,cwe,fwe or --tasks ruler")
    return [n for n in TASKS if n in names]


# ------------------------------------------------------------------------------------------------
# Scoring


def string_match_all(output: str, answers: Sequence[str]) -> float:
    """RULER's recall: the fraction of the answers found in the output (case-insensitive)."""
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def effective_length(score_by_length: dict[int, float], threshold: float = TASK_THRESHOLD) -> int:
    """The longest tested length such that every tested length up to it scores >= threshold (0: none)."""
    best = 0
    for length in sorted(score_by_length):
        if score_by_length[length] < threshold:
            break
        best = length
    return best


# ------------------------------------------------------------------------------------------------
# Generators: (task, size, rng, text) -> (prompt, answers); `size` counts haystack units and is
# chosen by the caller to fill the length.


@dataclass
class Sample:
    task: str
    length: int
    index: int
    prompt: str
    answers: list[str]
    prompt_ids: list[int] = field(default_factory=list, repr=False)


class HaystackText:
    """The evaluation text as an essay haystack (words) and a pool of distinct words (cwe)."""

    def __init__(self, text: str):
        self.words = re.sub(r"\s+", " ", text).strip().split(" ") if text.strip() else []
        if len(self.words) < 16:
            raise PizooError("tasks: the evaluation text has too few words for an essay haystack; use --data")
        seen = dict.fromkeys(w.lower() for w in re.findall(r"\b[a-zA-Z]{3,12}\b", text))
        self.vocabulary = sorted(seen)

    def essay(self, n_words: int, rng: random.Random) -> str:
        """n_words consecutive words from a seeded starting point (wrapping around)."""
        start = rng.randrange(len(self.words))
        return " ".join(self.words[(start + i) % len(self.words)] for i in range(n_words))

    def word_pool(self, n: int, rng: random.Random) -> list[str]:
        """n distinct words: the text's own, then pseudo-words of random letters when it has too few."""
        pool = list(self.vocabulary)
        while len(pool) < n:
            word = "".join(rng.choices(string.ascii_lowercase, k=7))
            if word not in pool:
                pool.append(word)
        return rng.sample(pool, n)


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def _insert_at_depths(sentences: list[str], needles: list[str], rng: random.Random) -> str:
    """RULER's essay insertion: each needle after the sentence at a depth drawn from DEPTHS."""
    cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
    parts, last = [], 0
    for cut, needle in zip(cuts, needles):
        parts += sentences[last:cut] + [needle]
        last = cut
    return " ".join(parts + sentences[last:])


def _insert_lines(lines: list[str], needles: list[str], rng: random.Random) -> str:
    """RULER's noise insertion: needles between lines at random positions, in order (several may
    share a gap, so any number of needles fits any haystack, even an empty one)."""
    lines = list(lines)
    positions = sorted(rng.choices(range(len(lines) + 1), k=len(needles)))
    for offset, (pos, needle) in enumerate(zip(positions, needles)):
        lines.insert(pos + offset, needle)
    return "\n".join(lines)


def niah_prompt(task: Task, size: int, rng: random.Random, text: HaystackText) -> tuple[str, list[str]]:
    s = task.settings
    n_keys = max(s["keys"], s["queries"])
    keys: list[str] = []
    while len(keys) < n_keys:
        k = _random_value(s["key"], rng)
        if k not in keys:
            keys.append(k)
    values = [[_random_value(s["value"], rng) for _ in range(s["values"])] for _ in keys]
    needles = [NEEDLE.format(type=s["value"], key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    if s["haystack"] == "essay":
        context = _insert_at_depths(_sentences(text.essay(size, rng)), needles, rng)
    elif s["haystack"] == "noise":
        context = _insert_lines([NOISE] * size, needles, rng)
    else:  # a haystack of distractor needles, none with a real key
        distractors = []
        while len(distractors) < size:
            k = _random_value(s["key"], rng)
            if k not in keys:
                distractors.append(NEEDLE.format(type=s["value"], key=k, value=_random_value(s["value"], rng)))
        context = _insert_lines(distractors, needles, rng)
    asked = rng.sample(range(n_keys), s["queries"])
    query = keys[asked[0]] if len(asked) == 1 else ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]]
    template, prefix = TEMPLATES["niah"]
    kind = s["value"]
    if s["queries"] * s["values"] == 1:  # RULER's singular wording
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix = prefix.replace("are", "is")
        kind = kind[:-1]
    prompt = (template + prefix).format(type=kind, context=context, query=query)
    return prompt, [v for i in asked for v in values[i]]


def _variable_names(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        if v not in names and v not in taken:
            names.append(v)
    return names


def _vt_context(size: int, rng: random.Random, hops: int, taken: set[str],
                avoid: str = "") -> tuple[str, str, list[str]]:
    names = _variable_names(hops + 1, rng, taken)
    value = avoid
    while value == avoid:
        value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return _insert_lines([NOISE] * size, chain, rng), value, names


def vt_prompt(task: Task, size: int, rng: random.Random, text: HaystackText) -> tuple[str, list[str]]:
    hops = task.settings["hops"]
    template, prefix = TEMPLATES["vt"]
    # One worked example with a short haystack (RULER's in-context example), then the question.
    ex_context, ex_value, ex_names = _vt_context(5, rng, hops, set())
    context, value, names = _vt_context(size, rng, hops, set(ex_names), avoid=ex_value)
    example = (template + prefix).format(context=ex_context, query=ex_value, num_v=hops + 1) + " ".join(ex_names)
    return example + "\n\n" + (template + prefix).format(context=context, query=value, num_v=hops + 1), names


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_prompt(task: Task, size: int, rng: random.Random, text: HaystackText, *,
               short: bool = False) -> tuple[str, list[str]]:
    """size distinct words; 10 of them common. short: RULER's repeats below 4k tokens (6x / 1x)."""
    n_common = task.settings["common"]
    (freq, rare), (ex_words, ex_freq, ex_rare) = ((6, 1), (20, 3, 1)) if short else ((30, 3), (40, 10, 3))
    words = text.word_pool(size + ex_words, rng)
    ex, words = words[:ex_words], words[ex_words:]
    template, prefix = TEMPLATES["cwe"]

    def listing(pool: list[str], f_common: int, f_rare: int) -> str:
        entries = pool[:n_common] * f_common + pool[n_common:] * f_rare
        rng.shuffle(entries)
        return _numbered(entries)

    example = (template + prefix).format(context=listing(ex, ex_freq, ex_rare)) + " " + _numbered(ex[:n_common])
    return example + "\n" + (template + prefix).format(context=listing(words, freq, rare)), words[:n_common]


def fwe_prompt(task: Task, size: int, rng: random.Random, text: HaystackText, *,
               vocab_size: int = 2000) -> tuple[str, list[str]]:
    """size words drawn with Zipf counts over vocab_size coded words; the top one is '...' (noise)."""
    alpha = task.settings["alpha"]
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        w = "".join(rng.choices(string.ascii_lowercase, k=6))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    vocab[0] = "..."
    zeta = sum(k ** -alpha for k in range(1, 100_000)) + 100_000 ** (1 - alpha) / (alpha - 1)
    entries = [w for k, w in enumerate(vocab, 1) for _ in range(int(size * k ** -alpha / zeta))]
    rng.shuffle(entries)
    template, prefix = TEMPLATES["fwe"]
    return (template + prefix).format(context=" ".join(entries)), vocab[1:4]


def passkey_task_prompt(task: Task, size: int, rng: random.Random, text: HaystackText) -> tuple[str, list[str]]:
    from .passkey import passkey_prompt, random_passkey

    key = random_passkey(rng)
    return passkey_prompt(key, size), [key]


GENERATORS: dict[str, Callable[..., tuple[str, list[str]]]] = {
    "niah": niah_prompt, "vt": vt_prompt, "cwe": cwe_prompt, "fwe": fwe_prompt, "passkey": passkey_task_prompt,
}
# The smallest haystack of each kind: fwe needs ~100 words for distinct counts at ranks 2-5.
MIN_SIZE = {"niah": 1, "vt": 1, "cwe": 11, "fwe": 100, "passkey": 0}


def sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    return random.Random(f"pizoo-task:{seed}:{task}:{length}:{index}")


def generate_prompt(name: str, length: int, index: int, size: int, seed: int,
                    text: HaystackText) -> tuple[str, list[str]]:
    """The prompt and answers of one sample at haystack size `size` (deterministic)."""
    task = TASKS[name]
    kwargs = {}
    if task.kind == "cwe":
        kwargs["short"] = length < 4096
    elif task.kind == "fwe":
        kwargs["vocab_size"] = max(16, (length - task.max_new_tokens) // 50)  # RULER's vocabulary per length
    return GENERATORS[task.kind](task, size, sample_rng(seed, name, length, index), text, **kwargs)


def largest_fitting(measure: Callable[[int], int], budget: int, lo: int, guess: int) -> int | None:
    """The largest size >= lo with measure(size) <= budget (measure grows with size); None if lo does not fit."""
    if measure(lo) > budget:
        return None
    good, bad = lo, None
    probe = max(lo + 1, guess)
    while bad is None:  # bracket: grow from the guess until a size does not fit
        if measure(probe) <= budget:
            good, probe = probe, max(probe + 1, int(probe * 1.25))
        else:
            bad = probe
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if measure(mid) <= budget else (good, mid)
    return good


def build_samples(name: str, length: int, samples: int, seed: int, text: HaystackText,
                  count_tokens: Callable[[str], int]) -> list[Sample] | str:
    """`samples` samples whose prompts fill length - max_new_tokens tokens, or the reason none fits."""
    task = TASKS[name]
    budget = length - task.max_new_tokens
    lo = MIN_SIZE[task.kind]

    def measure(size: int, index: int = 0) -> int:
        return count_tokens(generate_prompt(name, length, index, size, seed, text)[0])

    smallest = measure(lo)
    if smallest > budget:
        return (f"{name} at {length}: skipped, its shortest prompt and answer budget need "
                f"{smallest + task.max_new_tokens} tokens")
    per_unit = max(1e-3, (measure(lo + 8) - smallest) / 8)
    size = largest_fitting(measure, budget, lo, lo + int((budget - smallest) / per_unit))
    out = []
    for i in range(samples):
        # Each sample fits its own size: the haystack's words differ per sample, and so does the
        # number of tokens per word. The first sample's size is the starting guess.
        s = size if i == 0 else largest_fitting(lambda n: measure(n, i), budget, lo, size)
        if s is None:
            return f"{name} at {length}: skipped, sample {i}'s shortest prompt does not fit"
        prompt, answers = generate_prompt(name, length, i, s, seed, text)
        out.append(Sample(name, length, i, prompt, answers))
    return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
