"""The torch backend's estimators of the unread mid (SPEC 4, 5, 8), batched over ``[B, Hkv]``.

Each is an ``EstimatorOps``; ``estimate`` takes the read set's float32 rows (``torch_ops.ReadRows``)
and returns ``(lam, n_phi, d_phi)`` per query head. State is float32 (labels int32).
"""

from __future__ import annotations

import torch

from topkphi.backends import torch_fit as fit
from topkphi.backends import torch_ops as ops
from topkphi.backends.base import EstimatorOps, PageTokenOps
from topkphi.config import Config, Dims
from topkphi.feature_maps import FeatureMap
from topkphi.step import NEG_INF
from topkphi.summary import ClusterState, CompactPages, FeatureMapState, Summary, complete_pages

F32 = torch.float32
_FOLD_ELEMENTS = 1 << 24  # features materialized per fold chunk (taylor2 has m = 1 + d + d^2)


class FeatureMapOps(EstimatorOps):
    """SPEC 4-5: ``(S, z, C)`` folded with a running max offset; retrieved shares subtracted."""

    def __init__(self) -> None:
        self._params: dict[tuple[int, str], tuple[FeatureMap, tuple]] = {}

    def map_tensors(self, fmap: FeatureMap, device: torch.device) -> tuple:
        """``(kind, norm_coef, w_q, b_q, w_k, b_k)``, float32 on ``device`` (None for taylor2), converted once."""
        key = (id(fmap), str(device))
        hit = self._params.get(key)
        if hit is not None and hit[0] is fmap:  # the id of a freed map can be reused
            return hit[1]
        if fmap.kind == "taylor2":
            tensors = ("taylor2", 0.0, None, None, None, None)
        else:
            conv = [torch.as_tensor(p, dtype=F32, device=device) for p in (fmap.w_q, fmap.b_q, fmap.w_k, fmap.b_k)]
            tensors = (fmap.kind, float(fmap.norm_coef), *conv)
        if len(self._params) >= 64:
            self._params.clear()
        self._params[key] = (fmap, tensors)
        return tensors

    def empty(self, cfg: Config, dims: Dims, like) -> FeatureMapState:
        fmap = cfg.feature_map_for(dims.d)
        fmap.check_heads(dims.n_kv_heads)
        shape = (dims.batch, dims.n_kv_heads, fmap.n_features)
        return FeatureMapState(torch.zeros(*shape, dims.dv, device=like.device), torch.zeros(shape, device=like.device),
                               torch.full(shape[:2], NEG_INF, device=like.device))

    def fit(self, state, k, v, lo, hi, queries, cfg):
        return self.fold(state, k, v, lo, hi, cfg)

    def fold(self, state: FeatureMapState, k, v, lo, hi, cfg) -> FeatureMapState:
        d = k.shape[3]
        fmap = cfg.feature_map_for(d)
        kind, norm_coef, _, _, w_k, b_k = self.map_tensors(fmap, k.device)
        s, z, c_max = state.s, state.z, state.c_max
        step = max(1, _FOLD_ELEMENTS // (k.shape[0] * k.shape[1] * fmap.n_features))
        for start in range(lo, hi, step):  # chunks bound the materialized features
            stop = min(hi, start + step)
            f, c = ops.features(k[:, :, start:stop].to(F32), kind, w_k, b_k, norm_coef, cfg.tau(d))
            s, z, c_max = ops.fold(s, z, c_max, f, c, v[:, :, start:stop].to(F32))
        return FeatureMapState(s, z, c_max)

    def estimate(self, q_g, k_read, v_read, retrieved, reads, summary: Summary, cfg, tau):
        fmap = cfg.feature_map_for(q_g.shape[-1])
        fmap.check_heads(q_g.shape[1])
        kind, norm_coef, w_q, b_q, w_k, b_k = self.map_tensors(fmap, q_g.device)
        st: FeatureMapState = summary.estimate
        f_q, c_q = ops.features(q_g, kind, w_q, b_q, norm_coef, tau)  # [B,Hkv,G,m]
        c_big = torch.where(torch.isfinite(st.c_max), st.c_max, 0.0)[..., None]  # [B,Hkv,1]
        if kind == "taylor2":  # f_q . f_k = 1 + s + s^2 / 2 and c = 0: the scores suffice
            scores = tau * q_g @ k_read.transpose(-1, -2)
            share = torch.where(retrieved[:, :, None], 1 + scores + 0.5 * scores * scores, 0.0)
        else:
            f_k, c_k = ops.features(k_read, kind, w_k, b_k, norm_coef, tau)  # [B,Hkv,R,m]
            w_t = torch.where(retrieved, torch.exp(c_k - c_big), 0.0)[..., None] * f_k  # as folded into S, z
            share = f_q @ w_t.transpose(-1, -2)  # [B,Hkv,G,R]: the retrieved tokens' estimated share
        n_phi = f_q @ st.s - share @ v_read
        d_phi = (f_q @ st.z[..., None])[..., 0] - share.sum(-1)
        return c_q + c_big, n_phi, d_phi


class ClusterOps(EstimatorOps):
    """SPEC 8.1: query-metric k-means clusters with a fitted log-mass correction per cluster."""

    def empty(self, cfg: Config, dims: Dims, like) -> ClusterState:
        lead, c, d, dev = (dims.batch, dims.n_kv_heads), cfg.n_clusters, dims.d, like.device
        return ClusterState(torch.zeros(*lead, c, device=dev), torch.zeros(*lead, c, d, device=dev),
                            torch.zeros(*lead, c, dims.dv, device=dev), torch.zeros(*lead, c, device=dev),
                            torch.zeros(*lead, c, d, device=dev), torch.zeros(*lead, d, d, device=dev),
                            ops.spare(lead, dims.n_tokens, (), dev, torch.int32, fill=-1))

    def fit(self, state: ClusterState, k, v, lo, hi, queries, cfg) -> ClusterState:
        count, ksum, vsum, beta, centroids, metric, labels = fit.fit_clusters(k, v, lo, hi, queries, cfg)
        out = ops.extended(state.labels, k.shape[2], fill=-1)
        out[:, :, lo:hi] = labels.to(out.dtype)
        return ClusterState(count, ksum, vsum, beta, centroids, metric, out)

    def fold(self, state: ClusterState, k, v, lo, hi, cfg) -> ClusterState:
        """Tokens join their nearest frozen centroid; while fewer than C clusters exist, token ``j`` seeds
        cluster ``j - n_sink`` (the fit seeds ``min(C, |mid|)``: the same count for every head)."""
        n_clusters, n_sink = cfg.n_clusters, cfg.n_sink
        keys, values = k[:, :, lo:hi].to(F32), v[:, :, lo:hi].to(F32)
        labels = torch.zeros(keys.shape[:3], dtype=torch.int64, device=k.device)
        centroids = state.centroids
        n_seed = max(0, min(hi, n_sink + n_clusters) - lo)  # tokens of [lo, hi) that seed a cluster
        if n_seed:
            seeds = torch.arange(lo - n_sink, lo - n_sink + n_seed, device=k.device)
            centroids = centroids.clone()
            centroids[:, :, seeds] = keys[:, :, :n_seed]
            labels[:, :, :n_seed] = seeds
        if n_seed < hi - lo:
            labels[:, :, n_seed:] = fit.metric_labels(keys[:, :, n_seed:], centroids, state.metric)
        count, ksum, vsum = fit.cluster_sums(labels, keys, values, n_clusters)
        out = ops.extended(state.labels, k.shape[2], fill=-1)
        out[:, :, lo:hi] = labels.to(out.dtype)
        return ClusterState(state.count + count, state.ksum + ksum, state.vsum + vsum, state.beta, centroids,
                            state.metric, out)

    def estimate(self, q_g, k_read, v_read, retrieved, reads, summary: Summary, cfg, tau):
        st: ClusterState = summary.estimate
        n_clusters = cfg.n_clusters
        label = torch.gather(st.labels, 2, reads.idx.clamp(min=0)).to(torch.int64)
        label = torch.where(retrieved & (label >= 0), label, n_clusters)  # column C: not a retrieved member
        # sums of the retrieved members per cluster by scatter-add: a few thousand rows into C (+1 dump)
        # rows, without the one-hot matrix and its two thin fp32 products
        shape = (*label.shape[:2], n_clusters + 1)
        taken = torch.zeros(shape, dtype=F32, device=label.device).scatter_add_(2, label, retrieved.to(F32))
        k_taken = _scatter_rows(label, k_read, shape)
        v_taken = _scatter_rows(label, v_read, shape)
        left = st.count - taken[..., :n_clusters]  # n'_c: retrieved members are read exactly
        live = left > 0
        safe = torch.where(live, left, 1.0)[..., None]
        mu = (st.ksum - k_taken[:, :, :n_clusters]) / safe
        vbar = (st.vsum - v_taken[:, :, :n_clusters]) / safe
        logit = torch.log(safe[..., 0])[:, :, None] + tau * q_g @ mu.transpose(-1, -2) + st.beta[:, :, None]
        return ops.logit_sums(logit.masked_fill(~live[:, :, None], NEG_INF), vbar)


def _scatter_rows(label: torch.Tensor, rows: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``out [B,H,C+1,e]``: ``rows [B,H,R,e]`` summed by ``label [B,H,R]``."""
    index = label[..., None].expand(-1, -1, -1, rows.shape[-1])
    return torch.zeros((*shape, rows.shape[-1]), dtype=F32, device=rows.device).scatter_add_(2, index, rows)


class CompactOps(PageTokenOps):
    """SPEC 8.2: the unread complete pages estimated by their compact tokens (state: ``summary.pages``)."""

    def estimate(self, q_g, k_read, v_read, retrieved, reads, summary: Summary, cfg, tau):
        pages: CompactPages = summary.pages
        first, n_pages = complete_pages(summary.mid_start, summary.mid_end, cfg.page_size)
        page = reads.idx // cfg.page_size - first
        page = torch.where(retrieved & (page >= 0) & (page < n_pages), page, n_pages)  # column n: not a page
        taken = torch.zeros((*page.shape[:2], n_pages + 1), dtype=torch.bool, device=page.device)
        unread = ~taken.scatter_(2, page, True)[..., :n_pages]  # retrieved pages drop out by membership
        logit = tau * q_g @ pages.kappa[:, :, :n_pages].transpose(-1, -2) + pages.beta[:, :, None, :n_pages]
        return ops.logit_sums(logit.masked_fill(~unread[:, :, None], NEG_INF), pages.nu[:, :, :n_pages])
