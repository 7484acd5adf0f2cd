"""The oracle's estimators of the unread mid, in float64 (SPEC 4, 5, 8).

Each is an ``EstimatorOps``: empty state, prefill fit, fold-in, and the estimate
``(lam, n_phi, d_phi)`` per query head, written plainly one KV head at a time.
"""

from __future__ import annotations

import numpy as np

from topkphi.backends import numpy_fit as fit
from topkphi.backends.base import EstimatorOps, PageTokenOps
from topkphi.config import Config, Dims
from topkphi.feature_maps import FeatureMap
from topkphi.summary import ClusterState, CompactPages, FeatureMapState, ReferenceQueries, Summary, complete_pages


def features(x: np.ndarray, fmap: FeatureMap, side: str, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """``(f [B,H,n,m], c [B,H,n])`` for ``x [B,H,n,d]`` with ``phi(x) = exp(c) * f`` (SPEC 4)."""
    x_tilde = np.sqrt(tau) * x
    if fmap.kind == "taylor2":
        outer = np.einsum("...i,...j->...ij", x_tilde, x_tilde).reshape(*x.shape[:-1], -1) / np.sqrt(2.0)
        f = np.concatenate([np.ones((*x.shape[:-1], 1)), x_tilde, outer], axis=-1)
        return f, np.zeros(x.shape[:-1])
    w, b = (fmap.w_q, fmap.b_q) if side == "q" else (fmap.w_k, fmap.b_k)
    logits = np.einsum("bhnd,hmd->bhnm", x_tilde, np.asarray(w, np.float64)) + np.asarray(b, np.float64)[None, :, None]
    logits -= fmap.norm_coef * 0.5 * np.sum(x_tilde * x_tilde, axis=-1, keepdims=True)
    c = logits.max(axis=-1)
    return np.exp(logits - c[..., None]), c


class FeatureMapOps(EstimatorOps):
    """SPEC 4-5: ``(S, z, C)`` folded with a running max offset; retrieved shares subtracted."""

    def empty(self, cfg: Config, dims: Dims, like) -> FeatureMapState:
        fmap = cfg.feature_map_for(dims.d)
        fmap.check_heads(dims.n_kv_heads)
        shape = (dims.batch, dims.n_kv_heads, fmap.n_features)
        return FeatureMapState(np.zeros((*shape, dims.dv)), np.zeros(shape), np.full(shape[:2], -np.inf))

    def fit(self, state, k, v, lo, hi, queries, cfg):
        return self.fold(state, k, v, lo, hi, cfg)

    def fold(self, state: FeatureMapState, k, v, lo, hi, cfg) -> FeatureMapState:
        if hi <= lo:
            return state
        f, c = features(k[:, :, lo:hi], cfg.feature_map_for(k.shape[3]), "k", cfg.tau(k.shape[3]))
        c_new = np.maximum(state.c_max, c.max(axis=-1))
        rescale = np.exp(state.c_max - c_new)  # exp(-inf) = 0 clears the empty state
        w = np.exp(c - c_new[..., None])[..., None] * f
        return FeatureMapState(state.s * rescale[..., None, None] + np.einsum("bhnm,bhnv->bhmv", w, v[:, :, lo:hi]),
                               state.z * rescale[..., None] + w.sum(axis=2), c_new)

    def estimate(self, q_g, k_read, v_read, retrieved, reads, summary: Summary, cfg, tau):
        fmap = cfg.feature_map_for(q_g.shape[-1])
        st = summary.estimate
        f_q, c_q = features(q_g, fmap, "q", tau)  # [B,H,G,m]
        f_k, c_k = features(k_read, fmap, "k", tau)  # [B,H,R,m]
        c_big = np.where(np.isfinite(st.c_max), st.c_max, 0.0)
        w_t = np.where(retrieved, np.exp(c_k - c_big[..., None]), 0.0)[..., None] * f_k  # as folded into S, z
        share = np.einsum("bhgm,bhrm->bhgr", f_q, w_t)  # the retrieved tokens' estimated share
        n_phi = np.einsum("bhgm,bhmv->bhgv", f_q, st.s) - share @ v_read
        d_phi = np.einsum("bhgm,bhm->bhg", f_q, st.z) - share.sum(-1)
        return c_q + c_big[..., None], n_phi, d_phi


class ClusterOps(EstimatorOps):
    """SPEC 8.1: query-metric k-means clusters with a fitted log-mass correction per cluster."""

    def empty(self, cfg: Config, dims: Dims, like) -> ClusterState:
        b, h, c = dims.batch, dims.n_kv_heads, cfg.n_clusters
        return ClusterState(np.zeros((b, h, c)), np.zeros((b, h, c, dims.d)), np.zeros((b, h, c, dims.dv)),
                            np.zeros((b, h, c)), np.zeros((b, h, c, dims.d)), np.zeros((b, h, dims.d, dims.d)),
                            np.full((b, h, dims.n_tokens), -1, dtype=np.int64))

    def fit(self, state: ClusterState, k, v, lo, hi, queries: ReferenceQueries, cfg) -> ClusterState:
        batch, n_kv, _, d = k.shape
        q = np.asarray(queries.q, np.float64)
        group, window = q.shape[1] // n_kv, q.shape[2]
        positions = np.tile(np.arange(queries.end - window, queries.end), group)
        for b in range(batch):
            for g in range(n_kv):
                rows = q[b, g * group:(g + 1) * group].reshape(group * window, d)
                parts = fit.fit_clusters(rows, positions, k[b, g], v[b, g], lo, hi, cfg.n_sink, cfg.n_tail,
                                         cfg.top_k, cfg.n_clusters, cfg.tau(d), cfg.seed)
                for field, value in zip(("count", "ksum", "vsum", "beta", "centroids", "metric"), parts[:6]):
                    getattr(state, field)[b, g] = value
                state.labels[b, g, lo:hi] = parts[6]
        return state

    def fold(self, state: ClusterState, k, v, lo, hi, cfg) -> ClusterState:
        """Tokens join their nearest frozen centroid; while fewer than C clusters exist, each new
        token seeds one (the fit seeds ``min(C, |mid|)``, so the count of seeded clusters is the same
        for every head: ``min(C, tokens already in mid)``)."""
        labels = np.full((*state.labels.shape[:2], k.shape[2]), -1, dtype=np.int64)
        labels[:, :, : state.labels.shape[2]] = state.labels
        out = ClusterState(state.count.copy(), state.ksum.copy(), state.vsum.copy(), state.beta,
                           state.centroids.copy(), state.metric, labels)
        for j in range(lo, hi):
            n_seeded = min(cfg.n_clusters, j - cfg.n_sink)
            for b in range(k.shape[0]):
                for g in range(k.shape[1]):
                    key = k[b, g, j]
                    if n_seeded < cfg.n_clusters:
                        c = n_seeded
                        out.centroids[b, g, c] = key
                    else:
                        c = int(fit.metric_labels(key[None], out.centroids[b, g], out.metric[b, g])[0])
                    labels[b, g, j] = c
                    out.count[b, g, c] += 1
                    out.ksum[b, g, c] += key
                    out.vsum[b, g, c] += v[b, g, j]
        return out

    def estimate(self, q_g, k_read, v_read, retrieved, reads, summary: Summary, cfg, tau):
        st = summary.estimate
        batch, n_kv, group, _ = q_g.shape
        lam = np.full((batch, n_kv, group), -np.inf)
        n_phi = np.zeros((batch, n_kv, group, v_read.shape[-1]))
        d_phi = np.zeros((batch, n_kv, group))
        for b in range(batch):
            for g in range(n_kv):
                rows = np.flatnonzero(retrieved[b, g])
                onehot = np.eye(cfg.n_clusters)[st.labels[b, g, reads.idx[b, g, rows]]]  # [|T|, C]
                left = st.count[b, g] - onehot.sum(0)  # n'_c: retrieved members are read exactly
                live = left > 0
                if not live.any():
                    continue
                mu = (st.ksum[b, g] - onehot.T @ k_read[b, g, rows])[live] / left[live, None]
                vbar = (st.vsum[b, g] - onehot.T @ v_read[b, g, rows])[live] / left[live, None]
                logit = np.log(left[live]) + tau * q_g[b, g] @ mu.T + st.beta[b, g, live]  # [G, C']
                lam[b, g] = logit.max(axis=1)
                w = np.exp(logit - lam[b, g][:, None])
                d_phi[b, g], n_phi[b, g] = w.sum(axis=1), w @ vbar
        return lam, n_phi, d_phi


class CompactOps(PageTokenOps):
    """SPEC 8.2: the unread complete pages estimated by their compact tokens (state: ``summary.pages``)."""

    def estimate(self, q_g, k_read, v_read, retrieved, reads, summary: Summary, cfg, tau):
        pages: CompactPages = summary.pages
        batch, n_kv, group, _ = q_g.shape
        first, n_pages = complete_pages(summary.mid_start, summary.mid_end, cfg.page_size)
        lam = np.full((batch, n_kv, group), -np.inf)
        n_phi = np.zeros((batch, n_kv, group, v_read.shape[-1]))
        d_phi = np.zeros((batch, n_kv, group))
        for b in range(batch):
            for g in range(n_kv):
                taken = reads.idx[b, g][retrieved[b, g]] // cfg.page_size - first
                unread = np.ones(n_pages, dtype=bool)
                unread[taken[(taken >= 0) & (taken < n_pages)]] = False
                if not unread.any():
                    continue
                logit = tau * q_g[b, g] @ pages.kappa[b, g, unread].T + pages.beta[b, g, unread]
                lam[b, g] = logit.max(axis=1)
                w = np.exp(logit - lam[b, g][:, None])
                d_phi[b, g], n_phi[b, g] = w.sum(axis=1), w @ pages.nu[b, g, unread]
        return lam, n_phi, d_phi
