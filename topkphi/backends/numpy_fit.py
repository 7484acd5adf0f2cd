"""Closed-form fits of the fitted summaries in float64, one KV head at a time (SPEC 8).

The oracle's fits; the other backends fit the same quantities in their own arrays and are
checked against these on shared inputs.
"""

from __future__ import annotations

import numpy as np

LLOYD_ITERATIONS = 8  # a few Lloyd steps after k-means++; more changed the error by < 1% (ANCHORS)
BETA_SHRINK = 0.3  # alpha of SPEC 8.1: pulls small clusters' beta to the global ratio
RIDGE = 1e-4  # relative to the metric's mean eigenvalue: keeps the Cholesky factor well defined


def reference_scores(q_rows: np.ndarray, positions: np.ndarray, k_head: np.ndarray, tau: float):
    """``(s [R,N], lse [R])``: scores of reference rows ``q_rows [R,d]`` at absolute ``positions``
    over ``k_head [N,d]``, -inf where causality forbids (j > position), and each row's log-partition."""
    s = tau * q_rows @ k_head.T
    s = np.where(np.arange(k_head.shape[0])[None] <= positions[:, None], s, -np.inf)
    top = s.max(axis=1)
    return s, top + np.log(np.exp(s - top[:, None]).sum(axis=1))


def query_metric(q_rows: np.ndarray) -> np.ndarray:
    """``M = mean q q^T`` plus a small ridge (SPEC 8.1): the distance the clusters are cut by."""
    d = q_rows.shape[1]
    m = q_rows.T @ q_rows / max(1, q_rows.shape[0])
    return m + (RIDGE * np.trace(m) / d + 1e-12) * np.eye(d)


def kmeans(x: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Centroids ``[min(C, n), e]`` of ``x [n,e]``: k-means++ from ``seed``, then Lloyd steps."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    n_c = min(n_clusters, n)
    centers = [x[rng.integers(n)]]
    dist = ((x - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, n_c):
        total = dist.sum()
        pick = rng.choice(n, p=dist / total) if total > 0 else rng.integers(n)
        centers.append(x[pick])
        dist = np.minimum(dist, ((x - x[pick]) ** 2).sum(axis=1))
    centers = np.stack(centers)
    for _ in range(LLOYD_ITERATIONS):
        labels = nearest(x, centers)
        for c in range(n_c):
            members = labels == c
            if members.any():  # an emptied cluster keeps its centroid
                centers[c] = x[members].mean(axis=0)
    return centers


def nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest center (squared Euclidean; ties to the smaller index) for each row."""
    d2 = (x * x).sum(1)[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None]
    return np.argmin(d2, axis=1)


def metric_labels(keys: np.ndarray, centroids: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """Nearest centroid under ``(k - mu)^T M (k - mu)`` (the metric the fit clustered by)."""
    chol = np.linalg.cholesky(metric)
    return nearest(keys @ chol, centroids @ chol)


def fit_clusters(q_rows, positions, k_head, v_head, lo: int, hi: int, n_sink: int, n_tail: int, top_k: int,
                 n_clusters: int, tau: float, seed: int):
    """SPEC 8.1 for one KV head: ``(count, ksum, vsum, beta, centroids, metric, labels [hi - lo])``
    over the mid ``[lo, hi)``, from reference rows ``q_rows [R,d]`` at ``positions``."""
    d = k_head.shape[1]
    metric = query_metric(q_rows)
    keys = k_head[lo:hi]
    n_seeded = min(n_clusters, hi - lo)
    centroids = np.zeros((n_clusters, d))
    labels = np.zeros(0, dtype=np.int64)
    if n_seeded:
        chol = np.linalg.cholesky(metric)
        centroids[:n_seeded] = np.linalg.solve(chol.T, kmeans(keys @ chol, n_clusters, seed).T).T
        labels = metric_labels(keys, centroids[:n_seeded], metric)
    onehot = np.eye(n_clusters)[labels]  # [n_mid, C]
    count, ksum, vsum = onehot.sum(0), onehot.T @ keys, onehot.T @ v_head[lo:hi]
    beta = fit_beta(q_rows, positions, k_head, onehot, lo, hi, n_sink, n_tail, top_k, tau)
    return count, ksum, vsum, beta, centroids, metric, labels


def fit_beta(q_rows, positions, k_head, onehot, lo, hi, n_sink, n_tail, top_k, tau) -> np.ndarray:
    """Per-cluster log-mass correction (SPEC 8.1): each reference row drops its own Top-K of its
    own mid; ``t_c`` true residual mass, ``e_c`` the uncorrected estimate, shrunk to their ratio."""
    n_clusters = onehot.shape[1]
    s, lse = reference_scores(q_rows, positions, k_head, tau)
    s_mid = s[:, lo:hi]
    j = np.arange(lo, hi)
    row_mid = (j[None] >= n_sink) & (j[None] < positions[:, None] + 1 - n_tail)  # each row's own mid
    unread = row_mid.copy()
    for r in range(q_rows.shape[0]):
        cand = np.flatnonzero(row_mid[r])
        take = cand[np.argsort(-s_mid[r, cand], kind="stable")[: min(top_k, cand.size)]]
        unread[r, take] = False
    prob = np.where(unread, np.exp(np.where(unread, s_mid, 0.0) - lse[:, None]), 0.0)
    t = (prob @ onehot).sum(0)  # [C]
    n_unread = unread.astype(np.float64) @ onehot  # [R, C]
    score_sum = np.where(unread, s_mid, 0.0) @ onehot
    mean_score = np.where(n_unread > 0, score_sum / np.maximum(n_unread, 1), 0.0)
    e = np.where(n_unread > 0, n_unread * np.exp(mean_score - lse[:, None]), 0.0).sum(0)  # [C]
    if e.sum() <= 0 or t.sum() <= 0:
        return np.zeros(n_clusters)
    ratio, e_bar = t.sum() / e.sum(), e.mean()
    return np.log((t + BETA_SHRINK * ratio * e_bar) / (e + BETA_SHRINK * e_bar))


def fit_compact_page(keys: np.ndarray, values: np.ndarray, mass: np.ndarray):
    """SPEC 8.2, t = 1: ``(kappa [d], beta, nu [dv])`` of one page from its positions' mass ``a``."""
    total = mass.sum()
    if not total > 0:  # no query attended here: the mean token stands for the page
        return keys.mean(axis=0), float(np.log(len(keys))), values.mean(axis=0)
    best = int(np.argmax(mass))
    return keys[best], float(np.log(total / mass[best])), mass @ values / total
