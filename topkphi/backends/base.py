"""The decode step's skeleton, written once; backends supply only primitives.

``Backend`` owns ``build_summary`` / ``append`` / ``decode`` (checks, fold range, fit, fold,
pages, plan, select, attend, stats). A backend subclass implements the primitives below in its
own arrays; an estimator (feature map, clusters, compact tokens) is one ``EstimatorOps`` object
per backend, so adding one touches no skeleton. Imports no framework.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any

from topkphi import budget
from topkphi.budget import ArrayOps, BudgetStats, Ranking
from topkphi.config import Config, Dims, check_shapes
from topkphi.step import DecodeStats, ReadSet, StepPlan, plan_step, step_stats
from topkphi.summary import ReferenceQueries, Summary, check_compatible, fold_range


class EstimatorOps(ABC):
    """One estimator of the unread mid in one backend's arrays (SPEC 4, 5, 8)."""

    @abstractmethod
    def empty(self, cfg: Config, dims: Dims, like: Any) -> Any:
        """The state of an empty mid (``like``: an array giving device and dtype)."""

    @abstractmethod
    def fit(self, state: Any, k: Any, v: Any, lo: int, hi: int, queries: ReferenceQueries | None,
            cfg: Config) -> Any:
        """The state after the prefill's mid ``[lo, hi)`` entered it (a fit, or a plain fold)."""

    @abstractmethod
    def fold(self, state: Any, k: Any, v: Any, lo: int, hi: int, cfg: Config) -> Any:
        """The state after positions ``[lo, hi)`` left the tail; ``k``, ``v`` the whole cache."""

    @abstractmethod
    def estimate(self, q_g: Any, k_read: Any, v_read: Any, retrieved: Any, reads: ReadSet, summary: Summary,
                 cfg: Config, tau: float) -> tuple[Any, Any, Any]:
        """``(lam [B,Hkv,G], n_phi [B,Hkv,G,dv], d_phi [B,Hkv,G])`` of the unread part of mid:
        the estimate of ``exp(lam) * (sum v, sum 1)`` over ``mid \\ T`` (SPEC 5); ``d_phi = 0``
        where nothing is estimated. ``k_read``, ``v_read [B,Hkv,R,.]`` float32 are the read set's
        rows, ``retrieved [B,Hkv,R]`` marks its ``T`` entries."""


class PageTokenOps(EstimatorOps):
    """An estimator whose state is the selector's page metadata (``summary.pages``): compact tokens
    (SPEC 8.2). Nothing of its own to build or fold; a backend implements ``estimate`` only."""

    def empty(self, cfg: Config, dims: Dims, like: Any) -> None:
        return None

    def fit(self, state, k, v, lo, hi, queries, cfg) -> None:
        return None

    def fold(self, state, k, v, lo, hi, cfg) -> None:
        return None


class Backend(ABC):
    """SPEC 2-9 as one skeleton over a backend's primitives. ``decode`` returns ``(out, stats)``."""

    name: str

    # ------------------------------------------------------------ the skeleton

    def build_summary(self, k: Any, v: Any, cfg: Config, queries: ReferenceQueries | None = None) -> Summary:
        """Summarize the mid of ``k [B,Hkv,N,d]``, ``v [B,Hkv,N,dv]``; fitted summaries (SPEC 8)
        are fitted from ``queries`` (the last prompt rows), which ``cluster`` requires."""
        k, v = self.as_arrays(k, "k"), self.as_arrays(v, "v")
        dims = check_shapes(None, k, v)
        if cfg.estimator == "cluster" and queries is None:
            raise ValueError("feature_map='cluster' is fitted from reference queries: "
                             "pass queries=ReferenceQueries(...)")
        if queries is not None:
            _check_queries(queries, dims)
            if queries.window > cfg.fit_window:  # the last fit_window rows (SPEC 8)
                queries = ReferenceQueries(queries.q[:, :, queries.window - cfg.fit_window:], queries.end)
        summary = Summary(n_tokens=dims.n_tokens, mid_start=cfg.n_sink, mid_end=cfg.n_sink,
                          first_page=cfg.n_sink // cfg.page_size)
        lo, hi = cfg.n_sink, max(cfg.n_sink, dims.n_tokens - cfg.n_tail)
        ops = self.estimator_ops(cfg)
        if ops is not None:
            summary.estimate = ops.fit(ops.empty(cfg, dims, k), k, v, lo, hi, queries, cfg)
        if cfg.selection != "exact":
            pages = self.empty_pages(cfg, dims, k)
            if queries is not None and cfg.selection == "compact":
                pages = self.add_query_mass(pages, k, queries, cfg)
            summary.pages = self.fold_pages(pages, summary, k, v, lo, hi, cfg)
        summary.mid_end = hi
        return summary

    def append(self, summary: Summary, k: Any, v: Any, cfg: Config) -> Summary:
        """Fold the tokens that left the tail since ``summary``; ``k``, ``v`` are the whole cache.

        Costs O(new tokens) plus the touched pages; treat the old summary as consumed."""
        k, v = self.as_arrays(k, "k"), self.as_arrays(v, "v")
        check_shapes(None, k, v)
        n_tokens = k.shape[2]
        lo, hi = fold_range(summary, cfg, n_tokens)
        out = replace(summary, n_tokens=n_tokens, mid_end=hi)
        if hi == lo:
            return out
        ops = self.estimator_ops(cfg)
        if ops is not None:
            out.estimate = ops.fold(summary.estimate, k, v, lo, hi, cfg)
        if summary.pages is not None:
            out.pages = self.fold_pages(summary.pages, summary, k, v, lo, hi, cfg)
        return out

    def decode(self, q: Any, k: Any, v: Any, summary: Summary, cfg: Config,
               selected: Any = None) -> tuple[Any, DecodeStats]:
        """Attention of ``q [B,Hq,d]``: exact over sink + tail + ``T``, the estimator for the rest.

        ``selected [B,Hkv,T]`` (-1 padded), where a backend accepts it, replaces its own ``T``:
        parity tests feed one backend's selection to another, since near-ties may legitimately
        order differently in low precision. With ``selection="compact"`` the tail's exact attention
        mass is added to ``summary`` (pages completed during decode are fitted from it, SPEC 8.2)."""
        q, k, v = (self.as_arrays(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
        dims = self.check_inputs(q, k, v)
        check_compatible(summary, cfg, dims.n_tokens)
        plan = plan_step(cfg, summary, dims.n_tokens, dims.d, dims.dv, dims.n_kv_heads)
        tau = cfg.tau(dims.d)
        ranking = counts = None
        if selected is not None:
            reads = self.given_read_set(selected, plan)
        elif plan.budget != "fixed" and not plan.covers_mid:
            ranking, counts, reads = self._budget_read_set(q, k, v, summary, plan, cfg, tau)
        else:
            reads = self.read_set(q, k, summary, plan, cfg, tau)
        ops = self.estimator_ops(cfg) if plan.estimator is not None else None
        out, rho, lse = self.attend(q, k, v, reads, ops, summary, cfg, tau)
        if cfg.selection == "compact" and plan.regions.n_tokens > plan.regions.mid_end:
            summary.pages = self.add_tail_mass(summary.pages, q, k, lse, plan.regions, tau)
        stats = None if ranking is None else self._budget_stats(ranking, counts, rho, lse, dims, cfg)
        return out, step_stats(plan, reads, rho, lse, stats)

    # ------------------------------------------------------------ per-head budgets (SPEC 10)

    def _budget_read_set(self, q, k, v, summary: Summary, plan: StepPlan, cfg: Config,
                         tau: float) -> tuple[Ranking, Any, ReadSet]:
        """Rank the units, count each head's share (``topkphi.budget``), read them; in certificate mode
        read once, then extend each head's prefix until the certificate holds (or the cap)."""
        xp = self.array_ops
        logm, anchor = self.unit_masses(q, k, summary, plan, cfg, tau)
        ranking = budget.rank_units(xp, logm, anchor)
        if plan.budget == "mass":
            counts = budget.mass_counts(xp, ranking, cfg.max_dropped_mass, plan.n_floor, plan.n_take)
        else:
            counts = budget.marginal_counts(xp, ranking, plan.n_take, plan.n_floor)
        reads = self.units_read_set(budget.chosen_units(xp, ranking, counts, plan.width), summary, plan, cfg)
        if cfg.certify:
            exact_lse = self._grouped(self.attend(q, k, v, reads, None, summary, cfg, tau)[2], k.shape[1])
            counts = budget.certified_counts(xp, ranking, exact_lse, counts, cfg.max_dropped_mass, plan.n_take)
            reads = self.units_read_set(budget.chosen_units(xp, ranking, counts, plan.width), summary, plan, cfg)
        return ranking, counts, reads

    def _budget_stats(self, ranking: Ranking, counts: Any, rho: Any, lse: Any, dims: Dims,
                      cfg: Config) -> BudgetStats:
        xp = self.array_ops
        delta_hat = budget.dropped_at(xp, ranking.dropped, counts, ranking.rank)
        if not cfg.certify:
            return BudgetStats(counts, delta_hat, None, delta_hat > cfg.max_dropped_mass)
        # the exact part of the normalizer: lse less the estimate's share rho
        exact_lse = self._grouped(lse + xp.log(1.0 - rho), dims.n_kv_heads)
        delta_bar = budget.certificate(xp, ranking, exact_lse, counts)
        return BudgetStats(counts, delta_hat, delta_bar, delta_bar > cfg.max_dropped_mass)

    @staticmethod
    def _grouped(x: Any, n_kv: int) -> Any:
        """``[B,Hq] -> [B,Hkv,G]``."""
        return x.reshape(x.shape[0], n_kv, x.shape[1] // n_kv)

    # ------------------------------------------------------------ primitives

    @abstractmethod
    def as_arrays(self, x: Any, name: str) -> Any:
        """``x`` as this backend's array, or a ValueError naming ``name``."""

    def check_inputs(self, q: Any, k: Any, v: Any) -> Dims:
        """Shapes (and, in a subclass, dtypes and devices) of one decode call."""
        return check_shapes(q, k, v)

    @abstractmethod
    def estimator_ops(self, cfg: Config) -> EstimatorOps | None:
        """The ops of ``cfg.estimator`` in this backend (None: Top-K only)."""

    @abstractmethod
    def empty_pages(self, cfg: Config, dims: Dims, like: Any) -> Any:
        """Page metadata of an empty mid: ``PageBounds`` (page) or ``CompactPages`` (compact)."""

    @abstractmethod
    def fold_pages(self, pages: Any, summary: Summary, k: Any, v: Any, lo: int, hi: int, cfg: Config) -> Any:
        """Page metadata after ``[lo, hi)`` entered mid; ``summary`` is the state before it."""

    @abstractmethod
    def add_query_mass(self, pages: Any, k: Any, queries: ReferenceQueries, cfg: Config) -> Any:
        """Compact pages: add the attention mass the reference queries give each position."""

    @abstractmethod
    def add_tail_mass(self, pages: Any, q: Any, k: Any, lse: Any, regions: Any, tau: float) -> Any:
        """Compact pages: add this step's exact attention probabilities of the tail positions."""

    @abstractmethod
    def read_set(self, q: Any, k: Any, summary: Summary, plan: StepPlan, cfg: Config, tau: float) -> ReadSet:
        """The step's read set in the contract of ``topkphi.step`` (SPEC 3, 8.2)."""

    # per-head budgets (SPEC 10): the rule is ``topkphi.budget``'s; a backend gives these three

    array_ops: ArrayOps

    @abstractmethod
    def unit_masses(self, q: Any, k: Any, summary: Summary, plan: StepPlan, cfg: Config,
                    tau: float) -> tuple[Any, Any]:
        """``(logm [B,Hkv,G,U], anchor [B,Hkv,G])`` (``topkphi.budget``): per query head the log-mass of
        each unit (exact scores, Quest bounds ``log|p| + u_hp``, compact ``l_hp``) and the exact
        log-mass of the anchors (and compact fragments), which are read anyway."""

    @abstractmethod
    def units_read_set(self, units: Any, summary: Summary, plan: StepPlan, cfg: Config) -> ReadSet:
        """The read set of the chosen ``units [B,Hkv,W]`` (ascending, -1 padded): mid token offsets
        (exact) or page offsets from the first ranked page (page, compact; plus the fragments)."""

    def given_read_set(self, selected: Any, plan: StepPlan) -> ReadSet:
        """The read set of a given ``T`` (the oracle takes one; other backends need not)."""
        raise NotImplementedError(f"the {self.name} backend does not take a given selection")

    @abstractmethod
    def attend(self, q: Any, k: Any, v: Any, reads: ReadSet, ops: EstimatorOps | None, summary: Summary,
               cfg: Config, tau: float) -> tuple[Any, Any, Any]:
        """SPEC 5 over ``reads``: ``(out [B,Hq,dv] in q's dtype, rho [B,Hq], lse [B,Hq])``;
        ``ops=None`` is Top-K only."""

    @abstractmethod
    def dense(self, q: Any, k: Any, v: Any, scale: float | None = None) -> Any:
        """Exact softmax attention over the whole cache, ``[B,Hq,dv]``."""


def _check_queries(queries: ReferenceQueries, dims: Dims) -> None:
    shape = tuple(queries.q.shape)
    if len(shape) != 4 or shape[0] != dims.batch or shape[3] != dims.d or shape[1] % dims.n_kv_heads:
        raise ValueError(f"reference queries must be [B, Hq, W, d] with B={dims.batch}, d={dims.d} "
                         f"and Hq a multiple of {dims.n_kv_heads}; got {shape}")
    if not (shape[2] <= queries.end <= dims.n_tokens):
        raise ValueError(f"reference queries end at {queries.end}; the cache has {dims.n_tokens} tokens")


__all__ = ["Backend", "DecodeStats", "EstimatorOps", "PageTokenOps", "ReadSet"]
