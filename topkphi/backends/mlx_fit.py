"""Closed-form fits of the fitted summaries in MLX, batched over ``[B, Hkv]`` in float32 (SPEC 8).

The same quantities as the oracle's ``topkphi/backends/numpy_fit.py``; the k-means seeding draws
from MLX's RNG (``cfg.seed``), so its clusters differ from numpy's draws while every statistic
stays a function of the labels it returns.
"""

from __future__ import annotations

import math

import mlx.core as mx

from topkphi.backends.mlx_ops import f32, onehot, reference_scores, top_mask
from topkphi.backends.numpy_fit import BETA_SHRINK, LLOYD_ITERATIONS, RIDGE


def query_metric(rows: mx.array) -> mx.array:
    """``M = mean q q^T`` plus the oracle's ridge: ``rows [B,H,R,d]`` -> ``[B,H,d,d]``."""
    d = rows.shape[-1]
    m = rows.swapaxes(-1, -2) @ rows / max(1, rows.shape[2])
    trace = mx.trace(m, axis1=-2, axis2=-1)
    return m + (RIDGE * trace / d + 1e-12)[..., None, None] * mx.eye(d, dtype=mx.float32)


def metric_labels(keys: mx.array, centroids: mx.array, metric: mx.array) -> mx.array:
    """int32 nearest centroid under ``(k - mu)^T M (k - mu)``, ties to the smaller index.

    Written as ``mu^T M mu - 2 k^T M mu`` (``k^T M k`` is the same for every centroid): the
    distance of ``L^T k`` to ``L^T mu`` without a Cholesky factor, so fold-in runs on any stream."""
    mu_m = centroids @ metric  # M is symmetric
    dist = (mu_m * centroids).sum(axis=-1)[..., None, :] - 2.0 * (keys @ mu_m.swapaxes(-1, -2))
    return mx.argmin(dist, axis=-1).astype(mx.int32)


def _nearest(x: mx.array, centers: mx.array) -> mx.array:
    """int32 ``[B,H,n]`` nearest center (squared Euclidean, less ``|x|^2``: the same for every center)."""
    dist = (centers * centers).sum(-1)[..., None, :] - 2.0 * (x @ centers.swapaxes(-1, -2))
    return mx.argmin(dist, axis=-1).astype(mx.int32)


def kmeans(keys: mx.array, chol: mx.array, n_clusters: int, seed: int) -> mx.array:
    """Centroids ``[B,H,min(C,n),d]`` of ``keys [B,H,n,d]`` clustered as ``x = k L`` (k-means++ from
    ``seed``, then Lloyd steps). Centroids are kept in key space and mapped to x space: a mean of
    keys maps to the mean of their images, so no triangular solve is needed."""
    batch, heads, n, d = keys.shape
    x = keys @ chol
    n_c = min(n_clusters, n)
    rng = mx.random.key(seed)
    rng, sub = mx.random.split(rng)
    pick = mx.random.randint(0, n, (batch, heads), key=sub)
    picks = [pick]
    dist = ((x - _rows(x, pick)) ** 2).sum(-1)  # [B,H,n]
    for _ in range(1, n_c):
        rng, sub = mx.random.split(rng)
        total = dist.sum(-1, keepdims=True)
        # D^2 sampling; where every point is a center already, uniform (as the oracle)
        logits = mx.where(total > 0, mx.log(mx.maximum(dist, 0.0)), 0.0)
        pick = mx.random.categorical(logits, axis=-1, key=sub).astype(mx.int32)
        picks.append(pick)
        dist = mx.minimum(dist, ((x - _rows(x, pick)) ** 2).sum(-1))
    index = mx.stack(picks, axis=-1)  # [B,H,n_c]
    centroids = mx.take_along_axis(keys, index[..., None], axis=2)
    centers = mx.take_along_axis(x, index[..., None], axis=2)
    for _ in range(LLOYD_ITERATIONS):
        hot = onehot(_nearest(x, centers), n_c)  # [B,H,n,n_c]
        count = hot.sum(axis=2)[..., None]
        members = count > 0  # an emptied cluster keeps its centroid
        per = mx.maximum(count, 1.0)
        centroids = mx.where(members, hot.swapaxes(-1, -2) @ keys / per, centroids)
        centers = centroids @ chol  # the mean of images is the image of the mean: [C,d] work, not [n,d]
    return centroids


def _rows(x: mx.array, pick: mx.array) -> mx.array:
    """``x[b, h, pick[b, h]]`` as ``[B,H,1,e]``."""
    return mx.take_along_axis(x, pick[..., None, None].astype(mx.int32), axis=2)


def fit_clusters(rows, positions, k, v, lo: int, hi: int, cfg, tau: float):
    """SPEC 8.1 for every KV head: ``(count, ksum, vsum, beta, centroids, metric, labels [B,H,hi-lo])``
    over the mid ``[lo, hi)``, from reference ``rows [B,H,R,d]`` at ``positions [R]``."""
    batch, heads, _, d = k.shape
    n_clusters = cfg.n_clusters
    metric = query_metric(rows)
    keys, values = f32(k[:, :, lo:hi]), f32(v[:, :, lo:hi])
    n_seeded = min(n_clusters, hi - lo)
    centroids = mx.zeros((batch, heads, n_clusters, d), dtype=mx.float32)
    labels = mx.zeros((batch, heads, hi - lo), dtype=mx.int32)
    if n_seeded:
        chol = mx.linalg.cholesky(metric, stream=mx.cpu)  # MLX factors on the CPU only
        seeded = kmeans(keys, chol, n_clusters, cfg.seed)
        centroids = mx.concatenate([seeded, centroids[:, :, n_seeded:]], axis=2)
        labels = metric_labels(keys, seeded, metric)
    hot = onehot(labels, n_clusters)  # [B,H,n_mid,C]
    count, ksum, vsum = hot.sum(axis=2), hot.swapaxes(-1, -2) @ keys, hot.swapaxes(-1, -2) @ values
    beta = fit_beta(rows, positions, k, hot, lo, hi, cfg.n_sink, cfg.n_tail, cfg.top_k, tau)
    return count, ksum, vsum, beta, centroids, metric, labels


def fit_beta(rows, positions, k, hot, lo: int, hi: int, n_sink: int, n_tail: int, top_k: int,
             tau: float) -> mx.array:
    """Per-cluster log-mass correction ``[B,H,C]`` (SPEC 8.1; the oracle's ``fit_beta`` batched):
    each reference row drops its own Top-K of its own mid; ``t_c`` true residual mass, ``e_c`` the
    uncorrected estimate, shrunk to their ratio. ``hot [B,H,hi-lo,C]`` one-hot labels."""
    batch, heads, _, n_clusters = hot.shape
    if hi <= lo:
        return mx.zeros((batch, heads, n_clusters), dtype=mx.float32)
    s, lse = reference_scores(rows, positions, k, tau)
    s_mid = s[..., lo:hi]  # [B,H,R,n_mid]
    j = mx.arange(lo, hi)
    row_mid = (j[None] >= n_sink) & (j[None] < positions[:, None] + 1 - n_tail)  # [R,n_mid]
    # a row's Top-K over its own mid: positions outside it rank last and are masked off again
    take = top_mask(mx.where(row_mid, s_mid, -float("inf")), min(top_k, hi - lo)) & row_mid
    unread = row_mid & ~take
    s_unread = mx.where(unread, s_mid, 0.0)
    prob = mx.where(unread, mx.exp(s_unread - lse[..., None]), 0.0)
    t = (prob @ hot).sum(axis=2)  # [B,H,C]
    n_unread = unread.astype(mx.float32) @ hot  # [B,H,R,C]
    mean_score = mx.where(n_unread > 0, (s_unread @ hot) / mx.maximum(n_unread, 1.0), 0.0)
    e = mx.where(n_unread > 0, n_unread * mx.exp(mean_score - lse[..., None]), 0.0).sum(axis=2)  # [B,H,C]
    t_sum, e_sum = t.sum(-1, keepdims=True), e.sum(-1, keepdims=True)
    fitted = (t_sum > 0) & (e_sum > 0)
    ratio = mx.where(fitted, t_sum / mx.where(fitted, e_sum, 1.0), 1.0)
    e_bar = mx.mean(e, axis=-1, keepdims=True)
    num, den = t + BETA_SHRINK * ratio * e_bar, e + BETA_SHRINK * e_bar
    ok = fitted & (num > 0) & (den > 0)
    return mx.where(ok, mx.log(mx.where(ok, num, 1.0) / mx.where(ok, den, 1.0)), 0.0)


def fit_compact_pages(keys: mx.array, values: mx.array, mass: mx.array):
    """SPEC 8.2, t = 1, for pages ``keys [B,H,n,P,d]``, ``values [B,H,n,P,dv]``, ``mass [B,H,n,P]``:
    ``(kappa [B,H,n,d], beta [B,H,n], nu [B,H,n,dv])``; a page no query attended is its mean token."""
    keys, values, mass = f32(keys), f32(values), f32(mass)
    total = mass.sum(-1)
    attended = total > 0
    best = mx.argmax(mass, axis=-1).astype(mx.int32)  # the first maximum, as numpy
    kappa = mx.take_along_axis(keys, best[..., None, None], axis=3)[..., 0, :]
    a_best = mx.take_along_axis(mass, best[..., None], axis=3)[..., 0]
    safe_total = mx.where(attended, total, 1.0)
    beta = mx.where(attended, mx.log(safe_total / mx.where(attended, a_best, 1.0)), math.log(keys.shape[3]))
    nu = (mass[..., None] * values).sum(axis=3) / safe_total[..., None]
    return (mx.where(attended[..., None], kappa, keys.mean(axis=3)), beta,
            mx.where(attended[..., None], nu, values.mean(axis=3)))

