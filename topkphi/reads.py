"""Read accounting in token-equivalents per KV head per decode step (SPEC 6, 9).

One token-equivalent is one key plus one value, ``d + dv`` elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from topkphi.config import Config
from topkphi.feature_maps import FeatureMap
from topkphi.regions import n_selected_pages, page_span
from topkphi.summary import complete_pages

# a per-token cluster label is one int32: two elements of a 16-bit cache (SPEC 9)
LABEL_ELEMENTS = 2


@dataclass(frozen=True)
class ReadCounts:
    exact: float  # sink + tail + retrieved tokens
    summary: float  # the estimator's state and learned query-side parameters
    selection: float  # keys (exact), page metadata (page) or compact tokens (compact) read to choose T

    @property
    def total(self) -> float:
        return self.exact + self.summary + self.selection


def summary_reads(fmap: FeatureMap | None, d: int, dv: int) -> float:
    """A feature-map summary ``(S, z)`` plus learned query-side parameters (SPEC 6)."""
    if fmap is None:
        return 0.0
    return (fmap.n_features * (dv + 1) + fmap.query_param_count()) / (d + dv)


def estimator_reads(cfg: Config, n_retrieved: int, d: int, dv: int) -> float:
    """Reads of the config's estimator when it completes a head that retrieved ``n_retrieved`` tokens."""
    kind = cfg.estimator
    if kind == "feature_map":
        return summary_reads(cfg.feature_map_for(d), d, dv)
    if kind == "cluster":  # counts, key and value sums, beta; one label per retrieved token
        return (cfg.n_clusters * (d + dv + 2) + n_retrieved * LABEL_ELEMENTS) / (d + dv)
    return 0.0  # None; compact: its tokens are the selection's reads


def selection_reads(cfg: Config, n_mid: int, d: int, dv: int, covers: bool | None = None) -> float:
    """Zero when the budget takes the whole mid: nothing needs ranking, it is exact attention.

    ``covers`` says so where the caller decided it (per-head budgets, SPEC 10); by default a fixed
    ``top_k`` covers as in SPEC 2."""
    if cfg.selection == "exact":
        covers = cfg.top_k >= n_mid if covers is None else covers
        return 0.0 if covers else n_mid * d / (d + dv)
    mid_start, mid_end = cfg.n_sink, cfg.n_sink + n_mid
    if cfg.selection == "compact":
        n_pages = complete_pages(mid_start, mid_end, cfg.page_size)[1]
        covers = n_selected_pages(cfg.top_k, cfg.page_size, n_pages) >= n_pages if covers is None else covers
        return 0.0 if covers else n_pages * (d + dv + 1) / (d + dv)
    _, n_pages = page_span(mid_start, mid_end, cfg.page_size)
    covers = n_selected_pages(cfg.top_k, cfg.page_size, n_pages) >= n_pages if covers is None else covers
    return 0.0 if covers else 2 * math.ceil(n_mid / cfg.page_size) * d / (d + dv)


def read_counts(cfg: Config, n_read: int, n_mid: int, uses_summary: bool, d: int, dv: int,
                n_retrieved: int = 0) -> ReadCounts:
    """Reads of one decode step for one KV head that read ``n_read`` tokens exactly."""
    summary = estimator_reads(cfg, n_retrieved, d, dv) if uses_summary else 0.0
    return ReadCounts(float(n_read), summary, selection_reads(cfg, n_mid, d, dv))


def matched_top_k(cfg: Config, d: int, dv: int | None = None) -> int:
    """The Top-K-only baseline's budget at the same reads: the estimator's share becomes tokens.

    For clusters the label reads are counted at ``top_k`` retrieved tokens."""
    dv = d if dv is None else dv
    return cfg.top_k + math.ceil(estimator_reads(cfg, cfg.top_k, d, dv))
