"""One decode step, framework-free: its plan, its read set's layout, and its stats (SPEC 2-6, 9).

Every backend runs the same skeleton (``topkphi.backends.base.Backend``); this module holds
the decisions that skeleton makes, so they are written once:

- ``plan_step``: the regions, how many tokens or pages to take, and whether the budget covers
  the whole mid (then the step is exact attention and no estimator is read);
- the read-set contract every backend and kernel uses: ``idx [B,Hkv,R]`` holds the
  ``n_anchor`` sink and tail positions first (the same for every head: sink ascending, then
  tail ascending), then the retrieved mid tokens ``T`` ascending, then ``-1`` padding;
- ``step_stats``: reads per KV head (SPEC 6, 9) from the counts a backend returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from topkphi.config import Config
from topkphi.reads import LABEL_ELEMENTS, estimator_reads, selection_reads
from topkphi.regions import Regions, n_selected_pages, n_selected_tokens
from topkphi.summary import Summary

NEG_INF = float("-inf")


@dataclass(frozen=True)
class StepPlan:
    """What one decode step over ``n_tokens`` cached tokens does, the same for every head."""

    regions: Regions
    selection: str  # "exact", "page" or "compact"; "all" when the budget covers mid (or mid is empty)
    n_take: int  # tokens (exact) or pages (page, compact) each KV head takes
    estimator: str | None  # the config's estimator, None when it is off or nothing is unread
    summary_reads: float  # estimator reads of a head it completes, less the per-token label reads
    label_reads: float  # per retrieved token (cluster labels), token-equivalents
    selection_reads: float

    @property
    def covers_mid(self) -> bool:
        return self.selection == "all"


@dataclass
class ReadSet:
    """The tokens one step reads exactly; arrays in the backend's type (see the module doc).

    ``n_selected [B,Hkv]`` counts the valid entries of ``T``; page selections may take fewer
    tokens than ``n_take * page_size`` where a page is cut by a region boundary.
    """

    idx: Any  # [B, Hkv, R] int positions
    n_selected: Any  # [B, Hkv]
    n_anchor: int

    @property
    def selected(self) -> Any:
        """``T [B,Hkv,R - n_anchor]``, ascending, -1 padded (a view of ``idx``)."""
        return self.idx[..., self.n_anchor:]

    @property
    def n_read(self) -> Any:
        return self.n_selected + self.n_anchor


def plan_step(cfg: Config, summary: Summary, n_tokens: int, d: int, dv: int) -> StepPlan:
    """The plan of one decode step (SPEC 2, 3, 8.2): a budget covering mid is exact attention."""
    regions = Regions.of(n_tokens, cfg.n_sink, cfg.n_tail)
    n_mid = regions.n_mid
    if cfg.selection == "exact":
        n_take = n_selected_tokens(cfg.top_k, n_mid)
        covers = n_take >= n_mid
    else:
        n_take = n_selected_pages(cfg.top_k, cfg.page_size, summary.n_pages)
        covers = n_take >= summary.n_pages
    if n_mid == 0 or covers:
        return StepPlan(regions, "all", n_mid, None, 0.0, 0.0, 0.0)
    labels = LABEL_ELEMENTS / (d + dv) if cfg.estimator == "cluster" else 0.0
    return StepPlan(regions, cfg.selection, n_take, cfg.estimator, estimator_reads(cfg, 0, d, dv), labels,
                    selection_reads(cfg, n_mid, d, dv))


class DecodeStats:
    """Diagnostics of one decode step; arrays are the backend's own type.

    ``selected [B,Hkv,T]`` holds the retrieved mid positions (ascending, -1 padded where a KV
    head retrieved fewer); ``rho [B,Hq]`` is the estimated unretrieved mass fraction; ``lse
    [B,Hq]`` the log of the step's (exact + estimated) softmax normalizer; reads are per KV head.
    The read counts are computed when first asked for: a step replayed in a CUDA graph launches
    no work for statistics nobody reads.
    """

    def __init__(self, plan: StepPlan, reads: ReadSet, rho: Any, lse: Any = None) -> None:
        self.plan, self.reads, self.rho, self.lse = plan, reads, rho, lse

    @property
    def n_tokens(self) -> int:
        """Context length N."""
        return self.plan.regions.n_tokens

    @property
    def selected(self) -> Any:
        return self.reads.selected

    @property
    def n_selected(self) -> Any:
        return self.reads.n_selected

    @property
    def tokens_read(self) -> Any:
        """``[B, Hkv]`` keys+values read exactly (sink + tail + retrieved)."""
        return self.reads.n_read

    @property
    def token_equivalents(self) -> Any:
        """``[B, Hkv]`` exact + estimator + selection reads (SPEC 6, 9); a head is completed by the
        estimator where its ``T`` leaves part of mid unread."""
        plan, n_selected = self.plan, self.reads.n_selected
        total = self.reads.n_read * 1.0 + plan.selection_reads
        if plan.estimator is not None:
            completes = n_selected < plan.regions.n_mid
            total = total + completes * (plan.summary_reads + plan.label_reads * n_selected)
        return total

    def read_fraction(self) -> float:
        """Mean token-equivalents read per KV head as a fraction of the context."""
        return _mean(self.token_equivalents) / self.n_tokens


def step_stats(plan: StepPlan, reads: ReadSet, rho: Any, lse: Any) -> DecodeStats:
    """The step's statistics (SPEC 6, 9), their read counts written once in ``DecodeStats``."""
    return DecodeStats(plan, reads, rho, lse)


def _mean(x: Any) -> float:
    mean = x.mean()
    return float(mean.item() if hasattr(mean, "item") else mean)
