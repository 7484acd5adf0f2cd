"""The MLX estimators of the unread mid (SPEC 4, 5, 8), vectorized over ``[B, Hkv, G]`` in float32.

Each is an ``EstimatorOps`` with the oracle's semantics (``topkphi/backends/numpy_estimators.py``):
feature maps (prf, taylor2, learned), query-metric clusters, and the compact page tokens.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from topkphi.backends import mlx_fit as fit
from topkphi.backends.base import EstimatorOps, PageTokenOps
from topkphi.backends.mlx_ops import NEG_BIG, f32, grown, onehot, reference_rows
from topkphi.config import Config, Dims
from topkphi.feature_maps import FeatureMap
from topkphi.summary import ClusterState, FeatureMapState, ReferenceQueries, Summary


@dataclass(frozen=True)
class MapParams:
    """A ``FeatureMap`` as float32 MLX arrays, converted once per map (``FeatureMapOps.params``).

    Exp-linear maps: ``w_q, w_k [H', m, d]``, ``b_q, b_k [H', m]``; ``H'`` is 1 (shared by all
    KV heads) or ``Hkv``. ``taylor2`` has no parameters."""

    kind: str
    n_features: int
    norm_coef: float = 0.0
    w_q: mx.array | None = None
    b_q: mx.array | None = None
    w_k: mx.array | None = None
    b_k: mx.array | None = None

    @property
    def exp_linear(self) -> bool:
        return self.kind != "taylor2"


def features(x: mx.array, p: MapParams, side: str, tau: float) -> tuple[mx.array, mx.array]:
    """``(f [B,H,n,m], c [B,H,n])`` for float32 ``x [B,H,n,d]`` with ``phi(x) = exp(c) * f``."""
    x_t = math.sqrt(tau) * x
    if not p.exp_linear:
        outer = (x_t[..., :, None] * x_t[..., None, :]).reshape(*x.shape[:-1], -1) * (0.5**0.5)
        f = mx.concatenate([mx.ones((*x.shape[:-1], 1), dtype=mx.float32), x_t, outer], axis=-1)
        return f, mx.zeros(x.shape[:-1], dtype=mx.float32)
    w, b = (p.w_q, p.b_q) if side == "q" else (p.w_k, p.b_k)
    # the norm term is the same for every feature: it cancels in f and only shifts c
    logits = x_t @ w.swapaxes(-1, -2)[None] + b[None, :, None, :]
    top = logits.max(axis=-1)
    return mx.exp(logits - top[..., None]), top - p.norm_coef * 0.5 * mx.sum(x_t * x_t, axis=-1)


def c_reference(c_max: mx.array) -> mx.array:
    """The summary's offset ``C``, 0 while nothing is folded (its ``-inf``)."""
    c_max = f32(c_max)
    return mx.where(mx.isfinite(c_max), c_max, 0.0)


class FeatureMapOps(EstimatorOps):
    """SPEC 4-5: ``(S, z, C)`` folded with a running max offset; retrieved shares subtracted."""

    def __init__(self) -> None:
        self._params: weakref.WeakKeyDictionary[FeatureMap, MapParams] = weakref.WeakKeyDictionary()

    def params(self, cfg: Config, d: int, n_kv: int) -> MapParams:
        """The config's map as float32 MLX arrays, converted on first use and cached per map."""
        fmap = cfg.feature_map_for(d)
        fmap.check_heads(n_kv)
        cached = self._params.get(fmap)
        if cached is None:
            if fmap.exp_linear:
                arrays = [mx.array(np.asarray(a, dtype=np.float32)) for a in (fmap.w_q, fmap.b_q, fmap.w_k, fmap.b_k)]
                cached = MapParams(fmap.kind, fmap.n_features, float(fmap.norm_coef), *arrays)
            else:
                cached = MapParams(fmap.kind, fmap.n_features)
            self._params[fmap] = cached
        return cached

    def empty(self, cfg: Config, dims: Dims, like) -> FeatureMapState:
        m = self.params(cfg, dims.d, dims.n_kv_heads).n_features
        shape = (dims.batch, dims.n_kv_heads, m)
        return FeatureMapState(mx.zeros((*shape, dims.dv), dtype=mx.float32), mx.zeros(shape, dtype=mx.float32),
                               mx.full(shape[:2], -float("inf"), dtype=mx.float32))

    def fit(self, state, k, v, lo, hi, queries, cfg):
        return self.fold(state, k, v, lo, hi, cfg)

    def fold(self, state: FeatureMapState, k, v, lo, hi, cfg) -> FeatureMapState:
        if hi <= lo:
            return state
        d = k.shape[3]
        f, c = features(f32(k[:, :, lo:hi]), self.params(cfg, d, k.shape[1]), "k", cfg.tau(d))
        c_max = f32(state.c_max)
        c_new = mx.maximum(c_max, c.max(axis=-1))
        rescale = mx.exp(c_max - c_new)  # exp(-inf) = 0 clears the empty state
        w = mx.exp(c - c_new[..., None])[..., None] * f  # [B,H,n,m]
        s = f32(state.s) * rescale[..., None, None] + w.swapaxes(-1, -2) @ f32(v[:, :, lo:hi])
        return FeatureMapState(s, f32(state.z) * rescale[..., None] + w.sum(axis=2), c_new)

    def estimate(self, q_g, k_read, v_read, retrieved, reads, summary: Summary, cfg, tau):
        st = summary.estimate
        p = self.params(cfg, q_g.shape[-1], q_g.shape[1])
        f_q, c_q = features(q_g, p, "q", tau)  # [B,H,G,m]
        f_k, c_k = features(k_read, p, "k", tau)  # [B,H,R,m]
        c_big = c_reference(st.c_max)
        w_t = mx.where(retrieved, mx.exp(c_k - c_big[..., None]), 0.0)[..., None] * f_k  # as folded into S, z
        share = f_q @ w_t.swapaxes(-1, -2)  # [B,H,G,R]: the retrieved tokens' estimated share
        n_phi = f_q @ f32(st.s) - share @ v_read
        d_phi = (f_q * f32(st.z)[:, :, None, :]).sum(axis=-1) - share.sum(axis=-1)
        return c_q + c_big[..., None], n_phi, d_phi


class ClusterOps(EstimatorOps):
    """SPEC 8.1: query-metric k-means clusters with a fitted log-mass correction per cluster."""

    def empty(self, cfg: Config, dims: Dims, like) -> ClusterState:
        b, h, c, d, dv = dims.batch, dims.n_kv_heads, cfg.n_clusters, dims.d, dims.dv
        z = mx.float32
        return ClusterState(mx.zeros((b, h, c), dtype=z), mx.zeros((b, h, c, d), dtype=z),
                            mx.zeros((b, h, c, dv), dtype=z), mx.zeros((b, h, c), dtype=z),
                            mx.zeros((b, h, c, d), dtype=z), mx.zeros((b, h, d, d), dtype=z),
                            mx.full((b, h, dims.n_tokens), -1, dtype=mx.int32))

    def fit(self, state: ClusterState, k, v, lo, hi, queries: ReferenceQueries, cfg) -> ClusterState:
        rows = reference_rows(queries.q, k.shape[1])
        window = queries.window
        group = rows.shape[2] // window
        positions = mx.tile(mx.arange(queries.end - window, queries.end), group)
        count, ksum, vsum, beta, centroids, metric, labels = fit.fit_clusters(rows, positions, k, v, lo, hi, cfg,
                                                                               cfg.tau(k.shape[3]))
        all_labels = grown(state.labels, k.shape[2], -1)
        all_labels[..., lo:hi] = labels
        return ClusterState(count, ksum, vsum, beta, centroids, metric, all_labels)

    def fold(self, state: ClusterState, k, v, lo, hi, cfg) -> ClusterState:
        """Tokens join their nearest frozen centroid; while fewer than C clusters exist, each new
        token seeds one: position ``j`` seeds cluster ``j - n_sink`` while that is below C (the
        oracle's rule, the same for every head)."""
        n_c = cfg.n_clusters
        labels = grown(state.labels, k.shape[2], -1)
        centroids = f32(state.centroids)
        seed_hi = min(hi, cfg.n_sink + n_c)
        parts = []
        if seed_hi > lo:  # new clusters, seeded by these tokens themselves
            c_lo, c_hi = lo - cfg.n_sink, seed_hi - cfg.n_sink
            centroids = mx.concatenate([centroids[:, :, :c_lo], f32(k[:, :, lo:seed_hi]), centroids[:, :, c_hi:]],
                                       axis=2)
            parts.append(mx.broadcast_to(mx.arange(c_lo, c_hi, dtype=mx.int32), (*k.shape[:2], c_hi - c_lo)))
        near_lo = max(lo, seed_hi)
        if hi > near_lo:
            parts.append(fit.metric_labels(f32(k[:, :, near_lo:hi]), centroids, f32(state.metric)))
        new = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
        labels[..., lo:hi] = new
        hot = onehot(new, n_c).swapaxes(-1, -2)  # [B,H,C,n]
        return ClusterState(f32(state.count) + hot.sum(axis=-1), f32(state.ksum) + hot @ f32(k[:, :, lo:hi]),
                            f32(state.vsum) + hot @ f32(v[:, :, lo:hi]), f32(state.beta), centroids,
                            f32(state.metric), labels)

    def estimate(self, q_g, k_read, v_read, retrieved, reads, summary: Summary, cfg, tau):
        st = summary.estimate
        safe = mx.where(reads.idx >= 0, reads.idx, 0)
        hot = onehot(mx.take_along_axis(st.labels, safe, axis=2), cfg.n_clusters,
                     where=retrieved).swapaxes(-1, -2)  # [B,H,C,R]
        left = f32(st.count) - hot.sum(axis=-1)  # n'_c: retrieved members are read exactly
        live = left > 0.5
        per = mx.where(live, left, 1.0)[..., None]
        mu = (f32(st.ksum) - hot @ k_read) / per
        vbar = (f32(st.vsum) - hot @ v_read) / per
        logit = mx.log(per[..., 0])[:, :, None, :] + tau * (q_g @ mu.swapaxes(-1, -2)) + f32(st.beta)[:, :, None, :]
        logit = mx.where(live[:, :, None, :], logit, NEG_BIG)  # [B,H,G,C]
        return _log_sum(logit, live[:, :, None, :], vbar)


class CompactOps(PageTokenOps):
    """SPEC 8.2: the unread complete pages estimated by their compact tokens (state: ``summary.pages``)."""

    def estimate(self, q_g, k_read, v_read, retrieved, reads, summary: Summary, cfg, tau):
        pages = summary.pages
        n_pages = pages.kappa.shape[2]
        page = reads.idx // cfg.page_size - pages.first_complete
        hit = retrieved & (page >= 0) & (page < n_pages)
        taken = mx.zeros((*page.shape[:2], n_pages + 1), dtype=mx.int32)  # a dump column for the rest
        taken = mx.put_along_axis(taken, mx.where(hit, page, n_pages), mx.ones_like(page), axis=2)
        unread = (taken[..., :n_pages] == 0)[:, :, None, :]  # retrieved pages drop out by membership
        logit = tau * (q_g @ f32(pages.kappa).swapaxes(-1, -2)) + f32(pages.beta)[:, :, None, :]
        return _log_sum(mx.where(unread, logit, NEG_BIG), unread, f32(pages.nu))


def _log_sum(logit: mx.array, live: mx.array, values: mx.array):
    """``(lam, n_phi, d_phi)`` of the terms ``exp(logit)`` over the ``live`` last axis of ``logit
    [B,H,G,C]`` with values ``[B,H,C,dv]``; ``d_phi = 0`` where none is live."""
    lam = logit.max(axis=-1)
    w = mx.where(live, mx.exp(logit - lam[..., None]), 0.0)
    return lam, w @ values, w.sum(axis=-1)
