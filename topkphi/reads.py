"""Read accounting in token-equivalents per KV head per decode step (SPEC section 6).

One token-equivalent is one key plus one value, ``d + dv`` elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from topkphi.config import Config
from topkphi.feature_maps import FeatureMap
from topkphi.regions import n_selected_pages, page_span


@dataclass(frozen=True)
class ReadCounts:
    exact: float  # sink + tail + retrieved tokens
    summary: float  # (S, z) and learned query-side parameters
    selection: float  # keys (exact) or page metadata (page) read to choose T

    @property
    def total(self) -> float:
        return self.exact + self.summary + self.selection


def summary_reads(fmap: FeatureMap | None, d: int, dv: int) -> float:
    if fmap is None:
        return 0.0
    return (fmap.n_features * (dv + 1) + fmap.query_param_count()) / (d + dv)


def selection_reads(cfg: Config, n_mid: int, d: int, dv: int) -> float:
    """Zero when the budget takes the whole mid: nothing needs ranking, it is exact attention."""
    if cfg.selection == "exact":
        return 0.0 if cfg.top_k >= n_mid else n_mid * d / (d + dv)
    _, n_pages = page_span(cfg.n_sink, cfg.n_sink + n_mid, cfg.page_size)
    if n_selected_pages(cfg.top_k, cfg.page_size, n_pages) >= n_pages:
        return 0.0
    return 2 * math.ceil(n_mid / cfg.page_size) * d / (d + dv)


def read_counts(
    cfg: Config, n_read: int, n_mid: int, uses_summary: bool, fmap: FeatureMap | None, d: int, dv: int
) -> ReadCounts:
    """Reads of one decode step for one KV head that read ``n_read`` tokens exactly."""
    summary = summary_reads(fmap, d, dv) if uses_summary else 0.0
    return ReadCounts(float(n_read), summary, selection_reads(cfg, n_mid, d, dv))


def matched_top_k(cfg: Config, d: int, dv: int | None = None) -> int:
    """The Top-K-only baseline's budget at the same reads: the summary's share becomes tokens."""
    fmap = cfg.feature_map_for(d)
    return cfg.top_k + math.ceil(summary_reads(fmap, d, d if dv is None else dv))
