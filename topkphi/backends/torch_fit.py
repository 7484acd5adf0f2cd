"""Closed-form fits of the fitted summaries in torch, batched over ``[B, Hkv]`` (SPEC 8).

The same quantities as ``topkphi.backends.numpy_fit`` (the oracle), in float32 tensors; only the
k-means draws differ (a ``torch.Generator`` seeded from ``cfg.seed``, not NumPy's stream).
"""

from __future__ import annotations

import math

import torch

from topkphi.backends.numpy_fit import BETA_SHRINK, LLOYD_ITERATIONS, RIDGE
from topkphi.backends.torch_ops import topk_mask
from topkphi.config import Config
from topkphi.step import NEG_INF
from topkphi.summary import ReferenceQueries

_CHUNK_ELEMENTS = 1 << 24  # scores materialized per chunk of reference rows (or of keys)


def reference_rows(queries: ReferenceQueries, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_rows [B,Hkv,G*W,d] float32, positions [G*W])``: each KV head's reference rows (query head
    major, as the oracle orders them) and their absolute positions ``end - W .. end - 1``."""
    q = queries.q.to(torch.float32)
    batch, n_q, window, d = q.shape
    group = n_q // n_kv
    positions = torch.arange(queries.end - window, queries.end, device=q.device).repeat(group)
    return q.reshape(batch, n_kv, group * window, d), positions


def reference_chunks(q_rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, tau: float):
    """Yield ``(rows, s [B,H,r,N], lse [B,H,r])`` over chunks of the reference rows: causal scores
    (-inf where ``j > position``) over the whole cache and each row's log-partition."""
    batch, n_kv, n_rows, _ = q_rows.shape
    keys = k.to(torch.float32)
    n_tokens = keys.shape[2]
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * n_kv * n_tokens))
    j = torch.arange(n_tokens, device=k.device)
    for start in range(0, n_rows, step):
        rows = slice(start, min(n_rows, start + step))
        s = tau * q_rows[:, :, rows] @ keys.transpose(-1, -2)
        s = s.masked_fill(j[None] > positions[rows, None], NEG_INF)
        yield rows, s, torch.logsumexp(s, dim=-1)


def query_metric(q_rows: torch.Tensor) -> torch.Tensor:
    """``M [B,H,d,d] = mean q q^T`` plus a small ridge (SPEC 8.1): the distance the clusters are cut by."""
    d = q_rows.shape[-1]
    m = q_rows.transpose(-1, -2) @ q_rows / max(1, q_rows.shape[2])
    ridge = RIDGE * torch.diagonal(m, dim1=-2, dim2=-1).sum(-1) / d + 1e-12
    return m + ridge[..., None, None] * torch.eye(d, device=m.device)


def nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index ``[B,H,n]`` of the nearest center (squared Euclidean, ties to the smaller index)."""
    c2 = (centers * centers).sum(-1)[..., None, :]
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[1] * centers.shape[2]))
    return torch.cat([(c2 - 2 * x[:, :, i:i + step] @ centers.transpose(-1, -2)).argmin(-1)
                      for i in range(0, x.shape[2], step)], dim=2)


def metric_labels(keys: torch.Tensor, centroids: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Nearest centroid under ``(k - mu)^T M (k - mu)``; ``k^T M k`` is the same for every centroid,
    so ``mu^T M mu - 2 k^T M mu`` ranks them without a Cholesky factor."""
    m_mu = centroids @ metric  # M is symmetric
    bias = (centroids * m_mu).sum(-1)[..., None, :]
    step = max(1, _CHUNK_ELEMENTS // max(1, keys.shape[0] * keys.shape[1] * centroids.shape[2]))
    return torch.cat([(bias - 2 * keys[:, :, i:i + step] @ m_mu.transpose(-1, -2)).argmin(-1)
                      for i in range(0, keys.shape[2], step)], dim=2)


def kmeans(x: torch.Tensor, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Centroids ``[B,H,min(C, n),e]`` of ``x [B,H,n,e]``: k-means++, then Lloyd steps, per head."""
    batch, n_kv, n, e = x.shape
    flat = x.reshape(batch * n_kv, n, e)
    heads = torch.arange(batch * n_kv, device=x.device)
    pick = torch.randint(n, (batch * n_kv,), generator=generator, device=x.device)
    centers = [flat[heads, pick]]
    dist = ((flat - centers[0][:, None]) ** 2).sum(-1)
    for _ in range(1, min(n_clusters, n)):
        total = dist.sum(-1, keepdim=True)
        probs = torch.where(total > 0, dist, 1.0)  # every point on a center: uniform, as the oracle
        pick = torch.multinomial(probs, 1, generator=generator)[:, 0]
        centers.append(flat[heads, pick])
        dist = torch.minimum(dist, ((flat - centers[-1][:, None]) ** 2).sum(-1))
    out = torch.stack(centers, dim=1).reshape(batch, n_kv, -1, e)
    for _ in range(LLOYD_ITERATIONS):
        count, total, _ = cluster_sums(nearest(x, out), x, None, out.shape[2])
        out = torch.where(count[..., None] > 0, total / count.clamp(min=1)[..., None], out)  # emptied: kept
    return out


def cluster_sums(labels: torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None, n_clusters: int):
    """``(count [B,H,C], key sums [B,H,C,d], value sums [B,H,C,dv] or None)`` of ``labels [B,H,n]``."""
    index = labels.to(torch.int64)
    count = keys.new_zeros((*keys.shape[:2], n_clusters)).scatter_add_(2, index, torch.ones_like(keys[..., 0]))

    def sums(x):
        return x.new_zeros((*x.shape[:2], n_clusters, x.shape[3])).scatter_add_(
            2, index[..., None].expand(-1, -1, -1, x.shape[3]), x)

    return count, sums(keys), None if values is None else sums(values)


def fit_clusters(k: torch.Tensor, v: torch.Tensor, lo: int, hi: int, queries: ReferenceQueries, cfg: Config):
    """SPEC 8.1 for every KV head: ``(count, ksum, vsum, beta, centroids, metric, labels [B,H,hi-lo])``."""
    batch, n_kv, _, d = k.shape
    n_clusters = cfg.n_clusters
    q_rows, positions = reference_rows(queries, n_kv)
    metric = query_metric(q_rows)
    keys, values = k[:, :, lo:hi].to(torch.float32), v[:, :, lo:hi].to(torch.float32)
    n_seeded = min(n_clusters, hi - lo)
    centroids = keys.new_zeros(batch, n_kv, n_clusters, d)
    labels = torch.zeros(batch, n_kv, 0, dtype=torch.int64, device=k.device)
    if n_seeded:
        chol = torch.linalg.cholesky(metric)  # M = L L^T: Euclidean on k L is the metric on k
        generator = torch.Generator(device=k.device).manual_seed(cfg.seed)
        centers = kmeans(keys @ chol, n_clusters, generator)
        centroids[:, :, :n_seeded] = torch.linalg.solve_triangular(
            chol.transpose(-1, -2), centers.transpose(-1, -2), upper=True).transpose(-1, -2)
        labels = metric_labels(keys, centroids[:, :, :n_seeded], metric)
    count, ksum, vsum = cluster_sums(labels, keys, values, n_clusters)
    beta = fit_beta(q_rows, positions, k, labels, lo, hi, cfg)
    return count, ksum, vsum, beta, centroids, metric, labels


def fit_beta(q_rows, positions, k, labels, lo: int, hi: int, cfg: Config) -> torch.Tensor:
    """Per-cluster log-mass correction (SPEC 8.1, as ``numpy_fit.fit_beta``): each reference row drops
    its own Top-K of its own mid; ``t_c`` true residual mass, ``e_c`` the uncorrected estimate."""
    batch, n_kv = k.shape[:2]
    n_clusters = cfg.n_clusters
    t = q_rows.new_zeros(batch, n_kv, n_clusters)
    e = torch.zeros_like(t)
    if hi > lo:
        onehot = torch.nn.functional.one_hot(labels, n_clusters).to(torch.float32)  # [B,H,n_mid,C]
        j = torch.arange(lo, hi, device=k.device)
        n_take = min(cfg.top_k, hi - lo)
        for rows, s, lse in reference_chunks(q_rows, positions, k, cfg.tau(k.shape[3])):
            s_mid = s[..., lo:hi]
            row_mid = (j >= cfg.n_sink) & (j[None] < positions[rows, None] + 1 - cfg.n_tail)  # its own mid
            # each row's own Top-K as a mask: a threshold and the ties at it, no sort of positions
            unread = row_mid & ~topk_mask(s_mid.masked_fill(~row_mid, NEG_INF), n_take)
            prob = torch.where(unread, torch.exp(s_mid - lse[..., None]), 0.0)
            t += (prob @ onehot).sum(2)
            n_unread = unread.to(torch.float32) @ onehot  # [B,H,r,C]
            mean_score = (torch.where(unread, s_mid, 0.0) @ onehot) / n_unread.clamp(min=1)
            e += torch.where(n_unread > 0, n_unread * torch.exp(mean_score - lse[..., None]), 0.0).sum(2)
    t64, e64 = t.to(torch.float64), e.to(torch.float64)  # the ratio of two tiny sums stays finite
    ratio = t64.sum(-1, keepdim=True) / e64.sum(-1, keepdim=True).clamp(min=1e-300)
    e_bar = e64.mean(-1, keepdim=True)
    beta = torch.log((t64 + BETA_SHRINK * ratio * e_bar) / (e64 + BETA_SHRINK * e_bar))
    fitted = (e64.sum(-1, keepdim=True) > 0) & (t64.sum(-1, keepdim=True) > 0)
    return torch.where(fitted, beta, 0.0).to(torch.float32)


def fit_compact_pages(keys: torch.Tensor, values: torch.Tensor, mass: torch.Tensor):
    """SPEC 8.2, t = 1: ``(kappa [B,H,n,d], beta [B,H,n], nu [B,H,n,dv])`` of pages ``keys
    [B,H,n,P,d]``, ``values [B,H,n,P,dv]`` from their positions' mass ``[B,H,n,P]`` (all float32)."""
    total = mass.sum(-1)
    best = mass.argmax(-1, keepdim=True)  # the first maximum, as NumPy's argmax
    attended = total > 0  # else the mean token stands for the page
    kappa = torch.gather(keys, 3, best[..., None].expand(-1, -1, -1, -1, keys.shape[-1]))[..., 0, :]
    a_best = torch.gather(mass, 3, best)[..., 0]
    safe = torch.where(attended, total, 1.0)
    beta = torch.where(attended, torch.log(safe / torch.where(attended, a_best, 1.0)), math.log(keys.shape[3]))
    nu = (mass[..., None, :] @ values)[..., 0, :] / safe[..., None]
    return (torch.where(attended[..., None], kappa, keys.mean(3)), beta,
            torch.where(attended[..., None], nu, values.mean(3)))
