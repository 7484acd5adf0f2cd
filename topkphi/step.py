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

from topkphi.budget import BudgetStats, units_of
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
    budget: str = "fixed"  # SPEC 10: "mass" and "marginal" choose a count per KV head
    n_floor: int = 0  # units every head takes at least (mass, marginal)
    n_units: int = 0  # units there are to rank: mid tokens (exact) or pages
    n_heads: int = 1  # KV heads sharing a marginal spread

    @property
    def covers_mid(self) -> bool:
        return self.selection == "all"

    @property
    def width(self) -> int:
        """Most units one head can take: ``n_take`` (fixed: the count; mass: the cap), or for
        ``marginal`` the layer's total less the others' floors."""
        if self.budget != "marginal":
            return self.n_take
        return min(self.n_units, self.n_take * self.n_heads - (self.n_heads - 1) * self.n_floor)


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


def plan_step(cfg: Config, summary: Summary, n_tokens: int, d: int, dv: int, n_kv: int = 1) -> StepPlan:
    """The plan of one decode step (SPEC 2, 3, 8.2, 10): a budget covering mid is exact attention.

    Per-head budgets (SPEC 10) cover mid only when every head must take every unit: the floor
    (``mass``) or the mean (``marginal``) covers; ``n_kv`` is the heads a marginal spread shares."""
    regions = Regions.of(n_tokens, cfg.n_sink, cfg.n_tail)
    n_mid = regions.n_mid
    if cfg.selection == "exact":
        n_take = n_selected_tokens(cfg.top_k, n_mid)
        n_units = n_mid
    else:
        n_take = n_selected_pages(cfg.top_k, cfg.page_size, summary.n_pages)
        n_units = summary.n_pages
    n_floor = units_of(cfg, cfg.min_top_k, n_units, at_least_one=False)
    covers = {"fixed": n_take, "mass": n_floor, "marginal": n_take}[cfg.budget] >= n_units
    if n_mid == 0 or covers:
        return StepPlan(regions, "all", n_mid, None, 0.0, 0.0, 0.0)
    labels = LABEL_ELEMENTS / (d + dv) if cfg.estimator == "cluster" else 0.0
    return StepPlan(regions, cfg.selection, n_take, cfg.estimator, estimator_reads(cfg, 0, d, dv), labels,
                    selection_reads(cfg, n_mid, d, dv, covers=False), cfg.budget, n_floor, n_units, n_kv)


class DecodeStats:
    """Diagnostics of one decode step; arrays are the backend's own type.

    ``selected [B,Hkv,T]`` holds the retrieved mid positions (ascending, -1 padded where a KV
    head retrieved fewer); ``rho [B,Hq]`` is the estimated unretrieved mass fraction; ``lse
    [B,Hq]`` the log of the step's (exact + estimated) softmax normalizer; reads are per KV head.
    The read counts are computed when first asked for: a step replayed in a CUDA graph launches
    no work for statistics nobody reads.
    """

    def __init__(self, plan: StepPlan, reads: ReadSet, rho: Any, lse: Any = None,
                 budget: BudgetStats | None = None) -> None:
        self.plan, self.reads, self.rho, self.lse, self.budget = plan, reads, rho, lse, budget

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


def step_stats(plan: StepPlan, reads: ReadSet, rho: Any, lse: Any, budget: BudgetStats | None = None) -> DecodeStats:
    """The step's statistics (SPEC 6, 9, 10), their read counts written once in ``DecodeStats``;
    ``budget`` holds a per-head budget's dropped-mass estimate and certificate."""
    return DecodeStats(plan, reads, rho, lse, budget)


def _mean(x: Any) -> float:
    mean = x.mean()
    return float(mean.item() if hasattr(mean, "item") else mean)
