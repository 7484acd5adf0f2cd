"""Token ids of text longer than the model's context (haystacks, calibration text, evaluation windows).

transformers warns ("Token indices sequence length is longer than the specified maximum sequence length
for this model ... indexing errors") whenever one ``encode`` returns more ids than the tokenizer's
``model_max_length``. The callers here cut windows of the model's size out of such text themselves, so the
limit is lifted for that one call (``encode`` has no switch for it: its ``verbose`` is not passed on).
"""

from __future__ import annotations

NO_LIMIT = int(1e30)  # transformers' own "no limit" value (VERY_LARGE_INTEGER)


def _limit_holder(tokenizer):
    """The HF tokenizer that keeps ``model_max_length``: the tokenizer itself, or the one mlx-lm's wrapper holds."""
    for candidate in (tokenizer, getattr(tokenizer, "_tokenizer", None)):
        if "model_max_length" in getattr(candidate, "__dict__", {}):
            return candidate
    return None


def encode_long(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text)`` without the too-long warning, for any length of ``text``."""
    holder = _limit_holder(tokenizer)
    if holder is None:  # not an HF tokenizer: nothing warns
        return list(tokenizer.encode(text))
    limit = holder.model_max_length
    holder.model_max_length = NO_LIMIT
    try:
        return list(tokenizer.encode(text))
    finally:
        holder.model_max_length = limit
