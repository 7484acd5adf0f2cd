"""`topkphi chat --demo`: a built-in long-context prompt, so a first run shows what the method reads.

A short prompt is all sink and tail: every decode step reads it whole and the stats line says 100%. The
demo is a lighthouse keeper's log of ``DAYS`` entries (about 1,500 tokens with SmolLM2's tokenizer) with
one fact hidden in the middle, and a question about it; it is generated here (seeded), so it needs no
download and is the same on every machine.
"""

from __future__ import annotations

import random

DAYS = 34
NEEDLE_DAY = 15
NEEDLE = "the keeper hid the spare key to the lamp room inside the blue teapot in the kitchen"
QUESTION = "Where did the keeper hide the spare key to the lamp room? Answer in one sentence."

_WEATHER = ("Fog until noon", "Clear skies", "Light rain", "A strong gale", "Drizzle and mist", "Bright sun",
            "Low clouds", "Hail in the morning")
_WIND = ("from the north", "from the south-west", "from the east", "backing west", "veering north-east")
_SEA = ("a calm sea", "a heavy swell", "choppy water", "long rollers", "a flat grey sea")
_CHORES = ("cleaned the lens", "trimmed the wicks", "painted the railing", "mended the fog bell rope",
           "carried oil up the stairs", "checked the clockwork", "scrubbed the gallery floor",
           "wound the rotation weights", "logged two passing steamers", "repaired a cracked pane")
_SIGHTINGS = ("a fishing boat heading home", "seals on the rocks", "a schooner under full sail", "no vessels at all",
              "a flock of gannets", "the mail boat, two hours late", "a trawler anchored in the bay")


def demo_prompt() -> str:
    """The log and the question, as one user message."""
    rng = random.Random(0)
    lines = ["This is the log of the North Point lighthouse. Read it carefully; a question follows.", ""]
    for day in range(1, DAYS + 1):
        entry = (f"Day {day}. {rng.choice(_WEATHER)}, wind {rng.choice(_WIND)}, {rng.choice(_SEA)}. "
                 f"The keeper {rng.choice(_CHORES)} and {rng.choice(_CHORES)}; sighted {rng.choice(_SIGHTINGS)}.")
        if day == NEEDLE_DAY:
            entry += f" Before supper {NEEDLE}."
        lines.append(entry)
    lines += ["", QUESTION]
    return "\n".join(lines)
