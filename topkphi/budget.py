"""Per-head budgets (SPEC 10): how many units (tokens or pages) each KV head reads, written once.

A backend supplies, per query head, the log-mass of every selectable unit (``logm [B,Hkv,G,U]``:
exact scores for ``exact``, the Quest bound ``log|p| + u_hp`` for ``page``, the compact token's
``l_hp`` for ``compact``) and the exact log-mass of what is read anyway (``anchor [B,Hkv,G]``: sink,
tail and compact fragments), and a handful of array primitives (``ArrayOps``). Everything else,
the ranking, the dropped-mass rule, the marginal-gain spread and the certificate, is here.

With ``Z_h = exp(anchor_h) + sum_u exp(logm_hu)`` and ``p_hu = exp(logm_hu) / Z_h``:
units rank by ``key_u = max_{h in group} p_hu`` (ties to the smaller index), and after the first
``n`` units the estimated dropped fraction is ``D(n) = max_h sum_{rank >= n} p_hu``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from topkphi.config import Config


class ArrayOps(ABC):
    """The array primitives the rule needs, in one backend's arrays (all along the last axis)."""

    @abstractmethod
    def exp(self, x: Any) -> Any: ...

    @abstractmethod
    def log(self, x: Any) -> Any: ...

    @abstractmethod
    def logsumexp(self, x: Any) -> Any:
        """Over the last axis; ``-inf`` where every entry is ``-inf``."""

    @abstractmethod
    def amax(self, x: Any, axis: int) -> Any: ...

    @abstractmethod
    def argsort(self, x: Any) -> Any:
        """Stable ascending argsort along the last axis."""

    @abstractmethod
    def take(self, x: Any, idx: Any) -> Any:
        """``take_along_axis`` on the last axis (``idx`` broadcast against ``x``'s leading axes)."""

    @abstractmethod
    def cumsum(self, x: Any) -> Any: ...

    @abstractmethod
    def flip(self, x: Any) -> Any: ...

    @abstractmethod
    def count(self, mask: Any) -> Any:
        """Number of true entries along the last axis, as integers."""

    @abstractmethod
    def where(self, cond: Any, a: Any, b: Any) -> Any: ...

    @abstractmethod
    def clip(self, x: Any, lo: int, hi: int) -> Any: ...

    @abstractmethod
    def arange(self, n: int, like: Any) -> Any:
        """Integers ``0 .. n-1`` on ``like``'s device."""


def units_of(cfg: Config, top_k: int, n_units: int, at_least_one: bool) -> int:
    """Units a token budget buys: tokens for ``exact``; pages for ``page`` and ``compact`` (``K // P``,
    at least one where ``at_least_one``: the fixed budget's rule, SPEC 3)."""
    if cfg.selection == "exact":
        return min(top_k, n_units)
    pages = top_k // cfg.page_size
    return min(max(1, pages) if at_least_one else pages, n_units)


@dataclass
class Ranking:
    """The units of every KV head in rank order (see the module doc); arrays of the backend."""

    order: Any  # [B,H,U] unit indices, best first
    gain: Any  # [B,H,U] key_u in rank order (descending): the estimated gain of reading it next
    rest: Any  # [B,H,G,U] sum_{rank >= n} p_hu for n = 0 .. U-1
    dropped: Any  # [B,H,U] D(n) = max_h rest_h(n), non-increasing in n
    log_z: Any  # [B,H,G] log Z_h
    rank: Any  # [U] 0 .. U-1


def rank_units(xp: ArrayOps, logm: Any, anchor: Any) -> Ranking:
    """Rank ``logm [B,H,G,U]`` given the exact log-mass ``anchor [B,H,G]`` that is read anyway."""
    lse_units = xp.logsumexp(logm)
    top = xp.where(anchor > lse_units, anchor, lse_units)
    top = xp.where(top == float("-inf"), 0.0, top)
    log_z = top + xp.log(xp.exp(anchor - top) + xp.exp(lse_units - top))
    logp = logm - log_z[..., None]
    key = xp.amax(logp, 2)
    order = xp.argsort(-key)  # stable: ties to the smaller index
    p_sorted = xp.exp(xp.take(logp, order[:, :, None, :]))
    rest = xp.flip(xp.cumsum(xp.flip(p_sorted)))  # summed smallest first: accurate near the end
    return Ranking(order, xp.exp(xp.take(key, order)), rest, xp.amax(rest, 2), log_z, xp.arange(logm.shape[-1], logm))


def mass_counts(xp: ArrayOps, ranking: Ranking, delta: float, floor: int, cap: int) -> Any:
    """``[B,H]``: the fewest units with ``D(n) <= delta``, clipped to ``[floor, cap]``."""
    return xp.clip(xp.count(ranking.dropped > delta), floor, cap)


def marginal_counts(xp: ArrayOps, ranking: Ranking, mean: int, floor: int) -> Any:
    """``[B,H]``: a layer's ``H * mean`` units spread over its heads, each holding ``floor`` first and the
    rest going to the largest gains ``key_u`` of the batch row (a head's gains descend with rank, so each
    head takes a prefix; ties to the smaller head, then rank)."""
    batch, n_kv, n_units = ranking.order.shape
    free = ranking.rank >= floor
    gains = xp.where(free, ranking.gain, -1.0).reshape(batch, n_kv * n_units)
    place = xp.argsort(xp.argsort(-gains))  # each entry's place in the row's descending order
    picked = (place < n_kv * (mean - floor)) & (gains >= 0)
    return xp.count(picked.reshape(batch, n_kv, n_units)) + floor


def chosen_units(xp: ArrayOps, ranking: Ranking, counts: Any, width: int) -> Any:
    """``[B,H,width]``: each head's first ``counts`` units by rank, ascending, ``-1`` padded."""
    n_units = ranking.order.shape[-1]
    keep = ranking.rank[:width] < counts[..., None]
    key = xp.where(keep, ranking.order[..., :width], n_units)
    ascending = xp.take(key, xp.argsort(key))
    return xp.where(ascending == n_units, -1, ascending)


def dropped_at(xp: ArrayOps, values: Any, counts: Any, rank: Any) -> Any:
    """``values[..., n]`` at ``n = counts`` for a non-increasing ``values [..., U]`` (0 at ``n = U``)."""
    return xp.amax(xp.where(rank >= counts[..., None], values, 0.0), -1)


def certified_counts(xp: ArrayOps, ranking: Ranking, exact_lse: Any, counts: Any, delta: float,
                     cap: int) -> Any:
    """Certificate mode (SPEC 10): ``logm`` are upper bounds. Given the exact log-mass ``exact_lse
    [B,H,G]`` of a read set holding the first ``counts`` units, the fewest ``n >= counts`` (at most
    ``cap``) with ``B(n) / (E + B(n)) <= delta`` for every head of the group, ``B(n)`` the bound of
    the units ranked ``>= n``. Reading them can only grow ``E``, so the certificate then holds."""
    exact_frac = xp.exp(exact_lse - ranking.log_z)[..., None]  # E / Z
    fails = xp.amax(ranking.rest * (1.0 - delta) > delta * exact_frac, 2)  # [B,H,U], true for a prefix
    needed = xp.count(fails)
    return xp.clip(xp.where(needed > counts, needed, counts), 0, cap)


def certificate(xp: ArrayOps, ranking: Ranking, exact_lse: Any, counts: Any) -> Any:
    """``delta_bar [B,H] = max_h B_U / (E + B_U)`` of a read set with exact log-mass ``exact_lse``."""
    bound = dropped_at(xp, ranking.rest, counts[:, :, None], ranking.rank)  # [B,H,G] B_U / Z
    exact_frac = xp.exp(exact_lse - ranking.log_z)
    positive = bound > 0
    return xp.amax(xp.where(positive, bound / xp.where(positive, exact_frac + bound, 1.0), 0.0), 2)


@dataclass
class BudgetStats:
    """Per step and KV head (SPEC 10): ``units [B,H]`` taken, ``delta_hat [B,H]`` the estimated dropped
    fraction ``D(n)`` of the chosen set, ``delta_bar [B,H]`` its certificate (certify only), ``capped
    [B,H]`` where the cap stopped the rule before its target held."""

    units: Any
    delta_hat: Any
    delta_bar: Any = None
    capped: Any = None


def page_sizes(first_page: int, n_pages: int, page_size: int, mid_start: int, mid_end: int) -> list[int]:
    """Tokens of pages ``first_page ..`` inside mid (only the pages at mid's ends can be partial)."""
    return [max(0, min((p + 1) * page_size, mid_end) - max(p * page_size, mid_start))
            for p in range(first_page, first_page + n_pages)]


def fragments(mid_start: int, mid_end: int, page_size: int) -> tuple[range, range]:
    """The partial-page fragments at both ends of mid that compact selection reads exactly (SPEC 8.2)."""
    first = -(-mid_start // page_size)
    n = max(0, mid_end // page_size - first)
    return (range(mid_start, min(first * page_size, mid_end)),
            range(max(mid_start, (first + n) * page_size), mid_end))
