"""Where sink, tail and mid lie in a cache of N tokens, and how mid is cut into pages (SPEC 2-3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Regions:
    """``sink = [0, sink_end)``, ``mid = [mid_start, mid_end)``, ``tail = [mid_end, n_tokens)``."""

    n_tokens: int
    sink_end: int
    mid_start: int
    mid_end: int

    @classmethod
    def of(cls, n_tokens: int, n_sink: int, n_tail: int) -> Regions:
        if n_tokens <= n_sink + n_tail:  # everything is an anchor: exact attention
            return cls(n_tokens, n_tokens, n_tokens, n_tokens)
        return cls(n_tokens, n_sink, n_sink, n_tokens - n_tail)

    @property
    def n_mid(self) -> int:
        return self.mid_end - self.mid_start

    @property
    def n_anchor(self) -> int:
        return self.n_tokens - self.n_mid


def page_span(mid_start: int, mid_end: int, page_size: int) -> tuple[int, int]:
    """``(first_page, n_pages)`` of the absolute-position pages that intersect ``[mid_start, mid_end)``."""
    if mid_end <= mid_start:
        return mid_start // page_size, 0
    first = mid_start // page_size
    return first, (mid_end - 1) // page_size - first + 1


def n_selected_tokens(top_k: int, n_mid: int) -> int:
    """Exact selection keeps ``min(K, |mid|)`` tokens."""
    return min(top_k, n_mid)


def n_selected_pages(top_k: int, page_size: int, n_pages: int) -> int:
    """Page selection keeps ``max(1, K // P)`` pages, or all of them when there are fewer."""
    return min(max(1, top_k // page_size), n_pages)
