"""The fixed-size side state kept beside the KV cache (SPEC 4, 8).

Arrays are the backend's own type; this module only says what they hold. A ``Summary`` has
two independent parts: ``estimate``, the estimator's state (what completes the unread mid),
and ``pages``, the selector's page metadata. Either is None when the config does not use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from topkphi.config import Config


@dataclass
class FeatureMapState:
    """SPEC 4: ``s [B,Hkv,m,dv] = sum_j w_j v_j^T``, ``z [B,Hkv,m] = sum_j w_j`` with
    ``w_j = exp(c_k(k_j) - C) f_k(k_j)``; ``c_max [B,Hkv]`` is ``C`` (-inf while nothing is folded)."""

    s: Any
    z: Any
    c_max: Any


@dataclass
class ClusterState:
    """SPEC 8.1, per KV head: ``count [B,Hkv,C]``, key sums ``ksum [B,Hkv,C,d]``, value sums
    ``vsum [B,Hkv,C,dv]`` (float32 or wider), log-mass corrections ``beta [B,Hkv,C]``, the fit's
    frozen ``centroids [B,Hkv,C,d]`` and query metric ``metric [B,Hkv,d,d]`` (fold-in assigns by
    nearest centroid under it), and ``labels [B,Hkv,L]`` (int, -1 outside the folded mid) for the
    first ``L >= mid_end`` positions: beside the cache, not in it."""

    count: Any
    ksum: Any
    vsum: Any
    beta: Any
    centroids: Any
    metric: Any
    labels: Any


@dataclass
class PageBounds:
    """SPEC 3 (Quest): elementwise ``kmin``, ``kmax [B,Hkv,n_pages,d]`` of pages ``first_page ..``."""

    kmin: Any
    kmax: Any


@dataclass
class CompactPages:
    """SPEC 8.2, one compact token per complete mid page ``first_complete ..``: key ``kappa
    [B,Hkv,n,d]``, log-mass ``beta [B,Hkv,n]``, value ``nu [B,Hkv,n,dv]``; ``mass [B,Hkv,L]`` is the
    attention mass each position received (reference queries at prefill, then the exact tail
    probabilities of decode steps), from which a page is fitted when it leaves the tail."""

    kappa: Any
    beta: Any
    nu: Any
    mass: Any
    first_complete: int


@dataclass
class Summary:
    """What a backend keeps per layer beside the cache: folded range ``[mid_start, mid_end)``."""

    n_tokens: int  # cache length this summary describes
    mid_start: int
    mid_end: int
    first_page: int = 0
    estimate: FeatureMapState | ClusterState | None = None
    pages: PageBounds | CompactPages | None = None

    @property
    def n_folded(self) -> int:
        return self.mid_end - self.mid_start

    @property
    def n_pages(self) -> int:
        """Pages the selector ranks: Quest pages of the folded range, or its complete compact pages."""
        if isinstance(self.pages, PageBounds):
            return int(self.pages.kmin.shape[2])
        if isinstance(self.pages, CompactPages):
            return int(self.pages.kappa.shape[2])
        return 0


@dataclass
class ReferenceQueries:
    """Queries the fitted summaries are fitted from (SPEC 8): ``q [B,Hq,W,d]`` at absolute
    positions ``end - W .. end - 1`` (the last prompt rows, post-RoPE), each attending causally."""

    q: Any
    end: int

    @property
    def window(self) -> int:
        return int(self.q.shape[2])


def complete_pages(mid_start: int, mid_end: int, page_size: int) -> tuple[int, int]:
    """``(first, n)``: the pages lying wholly inside ``[mid_start, mid_end)`` (SPEC 8.2)."""
    first = -(-mid_start // page_size)
    return first, max(0, mid_end // page_size - first)


def check_compatible(summary: Summary, cfg: Config, n_tokens: int | None = None) -> None:
    """Refuse a summary made for another config, or (with ``n_tokens``) for another cache length."""
    if n_tokens is not None and summary.n_tokens != n_tokens:
        raise ValueError(f"summary describes {summary.n_tokens} tokens, the cache has {n_tokens}: call append")
    if summary.mid_start != cfg.n_sink:
        raise ValueError(f"summary was built with n_sink={summary.mid_start}, the config says {cfg.n_sink}")
    wanted = {"feature_map": FeatureMapState, "cluster": ClusterState}.get(cfg.estimator)
    if wanted is not None and not isinstance(summary.estimate, wanted):
        raise ValueError(f"summary holds no {cfg.estimator} state; rebuild it with this config")
    pages = {"page": PageBounds, "compact": CompactPages}.get(cfg.selection)
    if pages is not None and not isinstance(summary.pages, pages):
        raise ValueError(f"summary has no {cfg.selection} page metadata; rebuild it with selection={cfg.selection!r}")


def fold_range(summary: Summary, cfg: Config, n_tokens: int) -> tuple[int, int]:
    """``[lo, hi)``: the positions that left the tail since ``summary`` was made (empty if none)."""
    if n_tokens < summary.n_tokens:
        raise ValueError(f"the cache shrank from {summary.n_tokens} to {n_tokens} tokens: build a new summary")
    check_compatible(summary, cfg)
    lo = summary.mid_end
    return lo, max(lo, cfg.n_sink, n_tokens - cfg.n_tail)
