"""Task generators (seeded, answers at their stated depth) and RULER's metrics on known strings."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("wonderwords", reason="the evaluation tasks need wonderwords (pip install 'topkphi[eval]')")

from topkphi.evaluation import scoring  # noqa: E402
from topkphi.evaluation.tasks import NEEDLE_TASKS, QA_TASKS, generate  # noqa: E402


def encode(text: str) -> list[int]:
    return [ord(c) % 96 for c in text]


def word_encode(text: str) -> list[int]:
    return [len(w) for w in text.split()]


@pytest.mark.parametrize("task", [t for t in QA_TASKS if t != "niah_essay"])
def test_generators_are_seeded_and_fill_the_context(task):
    a = generate(task, 2, 1500, seed=3, encode=encode)
    b = generate(task, 2, 1500, seed=3, encode=encode)
    c = generate(task, 2, 1500, seed=4, encode=encode)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.answers for s in a] != [s.answers for s in c]
    assert a[0].prompt != a[1].prompt
    for s in a:
        assert s.n_tokens == len(encode(s.prompt)) <= 1500 - s.max_tokens
        assert s.n_tokens > 1500 - s.max_tokens - 200  # filled, up to one haystack unit
        for answer in s.answers:
            assert answer in s.prompt


@pytest.mark.parametrize("task", NEEDLE_TASKS + ("vt",))
def test_needles_sit_at_their_depth(task):
    for s in generate(task, 3, 3000, seed=0, encode=word_encode):
        assert len(s.needles) == len(s.depths) >= 1
        start = s.prompt.index("\n") + 1  # the haystack follows the one-line instruction
        end = s.prompt.rindex("\n", 0, s.prompt.rindex("\n"))  # ...and ends before question + answer prefix
        for needle, depth in zip(s.needles, s.depths):
            at = (s.prompt.index(needle) - start) / (end - start)
            assert abs(at - depth) < 0.03, (needle, at, depth)
        assert s.prompt.rstrip().endswith(("is", "are", "they are:"))


def test_multi_tasks_ask_for_every_value():
    (mv,) = generate("niah_multivalue", 1, 2000, 0, encode)
    (mq,) = generate("niah_multiquery", 1, 2000, 0, encode)
    (mk,) = generate("niah_multikey", 1, 2000, 0, encode)
    assert len(mv.answers) == 4 and len(mq.answers) == 4 and len(mk.answers) == 1 and len(mk.needles) == 4
    (cwe,) = generate("cwe", 1, 2000, 0, encode)
    listed = cwe.prompt.split("\n")[1].split()
    counts = {w: listed.count(w) for w in cwe.answers}
    assert min(counts.values()) > 3  # the common words outnumber the rest (3 each)


def test_text_windows_are_seeded():
    a = generate("kl", 2, 500, 1, encode)
    assert a[0].ids == generate("kl", 2, 500, 1, encode)[0].ids and len(a[0].ids) == 500
    assert a[0].ids != a[1].ids


def test_unknown_task_and_short_context():
    with pytest.raises(ValueError, match="unknown task"):
        generate("niah_foo", 1, 1000, 0, encode)
    with pytest.raises(ValueError, match="too short"):
        generate("niah_multiquery", 1, 100, 0, encode)


def test_ruler_string_match():
    assert scoring.string_match_all("The numbers are 12345 and 67890.", ["12345", "67890"]) == 1.0
    assert scoring.string_match_all(" 12345, 11111", ["12345", "67890"]) == 0.5
    assert scoring.string_match_all("nothing", ["12345"]) == 0.0
    assert scoring.string_match_all("VAR abcde", ["ABCDE"]) == 1.0  # case-insensitive
    assert scoring.string_match_part("only 67890", ["12345", "67890"]) == 1.0
    assert scoring.string_match_part("neither", ["12345", "67890"]) == 0.0
    assert scoring.postprocess("\x00 42\x1f ") == "42"
    with pytest.raises(ValueError):
        scoring.score("exact", "a", ["a"])


def test_kl_perplexity_and_terciles():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    assert np.allclose(scoring.kl_divergence(logits, logits), 0.0)
    other = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]))
    assert scoring.kl_divergence(logits, other)[0] == pytest.approx(0.25 * np.log(2))
    nll = scoring.token_nll(logits, np.array([0, 2]))
    assert scoring.perplexity(nll) == pytest.approx(np.exp(-(np.log(0.5) + np.log(0.8)) / 2))
    split = scoring.entropy_terciles(np.arange(9.0), {"m": np.array([1.0] * 3 + [2.0] * 3 + [3.0] * 3)})
    assert split["n"] == [3, 3, 3] and split["m"] == {"low": 1.0, "mid": 2.0, "high": 3.0, "all": 2.0}
