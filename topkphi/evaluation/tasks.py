"""Seeded, locally generated long-context tasks in the style of RULER (Hsieh et al., 2024).

Each generator returns a ``Sample``: a raw-completion prompt that ends in the answer prefix (small
base models answer that way far more reliably than through a chat template), the reference answers
and RULER's metric. Prompts are filled up to ``context - max_tokens`` tokens of the given tokenizer.

Differences from RULER, kept deliberately small: values are 5-digit numbers (RULER: 7), no
in-context example for vt and cwe, the essay haystack is Shakespeare (held-out plays) instead of
Paul Graham's essays, and generation stops at the first newline after the answer starts.

``kl`` and ``attn`` are not question tasks: their samples carry a window of ``context`` tokens of
held-out text (``ids``) for the teacher-forced KL and the per-head attention-output error.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from topkphi.evaluation import text as sources

NEEDLE_TASKS = ("niah_single", "niah_essay", "niah_multikey", "niah_multivalue", "niah_multiquery")
QA_TASKS = (*NEEDLE_TASKS, "vt", "cwe")
TEXT_TASKS = ("kl", "attn")
TASKS = (*QA_TASKS, *TEXT_TASKS)
DEFAULT_TASKS = TASKS

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
VALUE_DIGITS = 5
N_NEEDLES = 4  # keys in multikey / multiquery, values in multivalue
VT_HOPS = 4  # variable tracking: one chain of 5 variables
CWE_COMMON, CWE_FREQ, CWE_RARE_FREQ = 10, 30, 3


@dataclass
class Sample:
    task: str
    index: int
    prompt: str  # raw-completion prompt ending in the answer prefix ("" for kl / attn)
    answers: list[str]  # every reference the metric looks for
    metric: str  # "all" or "part" (RULER's string_match_all / string_match_part); "" for kl / attn
    max_tokens: int
    n_tokens: int  # prompt length in tokens
    depths: list[float] = field(default_factory=list)  # where each needle sits, as a fraction of the haystack
    needles: list[str] = field(default_factory=list)  # the inserted needle texts
    ids: list[int] | None = None  # kl / attn: the token window itself

    def as_dict(self) -> dict:
        return {"task": self.task, "index": self.index, "answers": self.answers, "metric": self.metric,
                "n_tokens": self.n_tokens, "depths": self.depths}


TokenCount = Callable[[str], int]


def _fit(build: Callable[[int], tuple[str, ...]], count: TokenCount, limit: int, lo: int = 0) -> tuple[int, tuple]:
    """The largest ``n >= lo`` whose ``build(n)[0]`` (the prompt) has at most ``limit`` tokens."""
    if count(build(lo)[0]) > limit:
        raise ValueError(f"--context is too short: even an empty haystack needs more than {limit} tokens")
    hi = max(lo + 1, 16)
    while count(build(hi)[0]) <= limit:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(build(mid)[0]) <= limit:
            lo = mid
        else:
            hi = mid
    return lo, build(lo)


def _numbers(rng: random.Random, n: int) -> list[str]:
    seen: list[str] = []
    while len(seen) < n:
        value = str(rng.randint(10 ** (VALUE_DIGITS - 1), 10**VALUE_DIGITS - 1))
        if value not in seen:
            seen.append(value)
    return seen


def _keys(rng: random.Random, n: int) -> list[str]:
    w = sources.words()
    keys: list[str] = []
    while len(keys) < n:
        key = f"{rng.choice(w['adjectives'])}-{rng.choice(w['nouns'])}"
        if key not in keys:
            keys.append(key)
    return keys


def _insert(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """``units`` with each needle inserted between units at its depth (fractions, any order)."""
    out = list(units)
    for depth, needle in sorted(zip(depths, needles), reverse=True):
        out.insert(round(depth * len(units)), needle)
    return out


def _join_query(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def niah(task: str, rng: random.Random, count: TokenCount, context: int, index: int) -> Sample:
    """The needle-in-a-haystack family (RULER's niah_single_1/2, multikey_1, multivalue, multiquery)."""
    n_keys = {"niah_multikey": N_NEEDLES, "niah_multiquery": N_NEEDLES}.get(task, 1)
    n_values = N_NEEDLES if task == "niah_multivalue" else 1
    n_query = N_NEEDLES if task == "niah_multiquery" else 1
    keys = _keys(rng, n_keys)
    values = {key: _numbers(rng, n_values) for key in keys}
    needles = [NEEDLE.format(key=k, value=v) for k in keys for v in values[k]]
    rng.shuffle(needles)
    depths = [rng.uniform(0.0, 1.0) for _ in needles]
    queried = keys[:n_query]
    answers = [v for k in queried for v in values[k]]
    plural = len(answers) > 1
    kind = "numbers" if plural else "number"
    query = _join_query(queried)
    head = (f"Some special magic {kind} are hidden within the following text. "
            f"Make sure to memorize it. I will quiz you about the {kind} afterwards.\n")
    if plural:
        tail = (f"\nWhat are all the special magic numbers for {query} mentioned in the provided text?\n"
                f"The special magic numbers for {query} mentioned in the provided text are")
    else:
        tail = (f"\nWhat is the special magic number for {query} mentioned in the provided text?\n"
                f"The special magic number for {query} mentioned in the provided text is")
    max_tokens = 8 * len(answers) + 4
    if task == "niah_essay":
        lines = sources.essay_lines()
        start = rng.randrange(len(lines))

        def units(n: int) -> list[str]:
            return [lines[(start + i) % len(lines)] for i in range(n)]

        sep = "\n"
    else:
        def units(n: int) -> list[str]:
            return [NOISE] * n

        sep = " "

    def build(n: int) -> tuple[str]:
        return (head + sep.join(_insert(units(n), needles, depths)) + tail,)

    _, (prompt,) = _fit(build, count, context - max_tokens)
    return Sample(task, index, prompt, answers, "all", max_tokens, count(prompt), depths, needles)


def variable_tracking(rng: random.Random, count: TokenCount, context: int, index: int) -> Sample:
    """RULER's vt: one chain ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in the noise haystack."""
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    (value,) = _numbers(rng, 1)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.uniform(0.0, 1.0) for _ in needles)  # the chain in order
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above.\n"
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
            f"are assigned the value {value}, they are:")
    max_tokens = 6 * len(names) + 4

    def build(n: int) -> tuple[str]:
        return (head + " ".join(_insert([NOISE] * n, needles, depths)) + tail,)

    _, (prompt,) = _fit(build, count, context - max_tokens)
    return Sample("vt", index, prompt, names, "all", max_tokens, count(prompt), depths, needles)


def common_words(rng: random.Random, count: TokenCount, context: int, index: int) -> Sample:
    """RULER's cwe: a numbered word list; 10 words appear 30 times (fewer if the context is short), the rest 3."""
    w = sources.words()
    vocabulary = sorted(set(w["nouns"] + w["adjectives"] + w["verbs"]))
    pool = rng.sample(vocabulary, len(vocabulary))
    common, rare_pool = pool[:CWE_COMMON], pool[CWE_COMMON:]
    head = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
    tail = (f"\nQuestion: What are the {CWE_COMMON} most common words in the above list?\n"
            f"Answer: The top {CWE_COMMON} words that appear most often in the list are:")
    max_tokens = 5 * CWE_COMMON + 4
    order_seed = rng.random()

    def build_with(freq: int) -> Callable[[int], tuple[str]]:
        def build(n_rare: int) -> tuple[str]:
            listed = common * freq + [word for word in rare_pool[:n_rare] for _ in range(CWE_RARE_FREQ)]
            random.Random(order_seed).shuffle(listed)
            return (head + " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed)) + tail,)

        return build

    limit = context - max_tokens
    freq = CWE_FREQ
    while freq > CWE_RARE_FREQ + 1 and count(build_with(freq)(0)[0]) > limit:
        freq -= 1  # short contexts: the common words stay more frequent than the rest
    _, (prompt,) = _fit(build_with(freq), count, limit)
    return Sample("cwe", index, prompt, list(common), "all", max_tokens, count(prompt))


def text_window(task: str, rng: random.Random, encode: Callable[[str], list[int]], context: int, index: int,
                _cache: dict = {}) -> Sample:  # noqa: B006 - per-process memo of the encoded text
    """``context`` tokens of held-out text, starting at a seeded offset."""
    key = id(encode)
    if key not in _cache:
        _cache.clear()
        _cache[key] = list(encode(sources.long_text()))
    ids = _cache[key]
    if len(ids) < context:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than --context {context}")
    start = rng.randrange(len(ids) - context + 1)
    return Sample(task, index, "", [], "", 0, context, ids=ids[start : start + context])


def generate(task: str, n_samples: int, context: int, seed: int, encode: Callable[[str], list[int]]) -> list[Sample]:
    """``n_samples`` samples of ``task`` at ``context`` tokens; the same under the same seed and tokenizer."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected some of {', '.join(TASKS)}")

    def count(prompt: str) -> int:
        return len(encode(prompt))

    out = []
    for i in range(n_samples):
        rng = random.Random(f"{seed}/{task}/{context}/{i}")
        if task in TEXT_TASKS:
            out.append(text_window(task, rng, encode, context, i))
        elif task == "vt":
            out.append(variable_tracking(rng, count, context, i))
        elif task == "cwe":
            out.append(common_words(rng, count, context, i))
        else:
            out.append(niah(task, rng, count, context, i))
    return out
