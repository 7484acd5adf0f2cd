"""The float64 NumPy oracle: the SPEC written out plainly. Every other backend is tested against it.

It supplies the primitives of ``topkphi.backends.base.Backend`` one KV head at a time, in float64.
"""

from __future__ import annotations

import numpy as np

from topkphi.backends import numpy_budget
from topkphi.backends import numpy_fit as fit
from topkphi.backends.base import Backend
from topkphi.backends.numpy_estimators import ClusterOps, CompactOps, FeatureMapOps
from topkphi.backends.numpy_estimators import features as features  # re-exported: analyses use it
from topkphi.config import Config, Dims, check_shapes
from topkphi.regions import page_span
from topkphi.step import ReadSet
from topkphi.summary import CompactPages, PageBounds, ReferenceQueries, Summary, complete_pages

ESTIMATOR_OPS = {"feature_map": FeatureMapOps(), "cluster": ClusterOps(), "compact": CompactOps()}


class NumpyBackend(Backend):
    """Reference implementation in float64; slow and exact by construction."""

    name = "numpy"
    array_ops = numpy_budget.NumpyArrayOps()

    def as_arrays(self, x, name):
        return np.asarray(x, dtype=np.float64)

    def estimator_ops(self, cfg: Config):
        return ESTIMATOR_OPS.get(cfg.estimator)

    # ------------------------------------------------------------ pages (SPEC 3, 8.2)

    def empty_pages(self, cfg: Config, dims: Dims, like):
        b, h, d = dims.batch, dims.n_kv_heads, dims.d
        if cfg.selection == "page":
            return PageBounds(np.zeros((b, h, 0, d)), np.zeros((b, h, 0, d)))
        first, _ = complete_pages(cfg.n_sink, cfg.n_sink, cfg.page_size)
        return CompactPages(np.zeros((b, h, 0, d)), np.zeros((b, h, 0)), np.zeros((b, h, 0, dims.dv)),
                            np.zeros((b, h, dims.n_tokens)), first)

    def fold_pages(self, pages, summary: Summary, k, v, lo, hi, cfg: Config):
        if isinstance(pages, PageBounds):
            return _update_bounds(pages, summary.mid_start, k, lo, hi, cfg.page_size)
        first, n_old = complete_pages(summary.mid_start, lo, cfg.page_size)
        _, n_new = complete_pages(summary.mid_start, hi, cfg.page_size)
        mass = _grown(pages.mass, k.shape[2])
        batch, n_kv = k.shape[:2]
        fitted = [[[fit.fit_compact_page(k[b, g, p * cfg.page_size:(p + 1) * cfg.page_size],
                                         v[b, g, p * cfg.page_size:(p + 1) * cfg.page_size],
                                         mass[b, g, p * cfg.page_size:(p + 1) * cfg.page_size])
                    for p in range(first + n_old, first + n_new)] for g in range(n_kv)] for b in range(batch)]
        if n_new == n_old:
            return CompactPages(pages.kappa, pages.beta, pages.nu, mass, first)
        kappa, beta, nu = (np.array([[[page[i] for page in head] for head in row] for row in fitted]) for i in range(3))
        return CompactPages(np.concatenate([pages.kappa, kappa], axis=2), np.concatenate([pages.beta, beta], axis=2),
                            np.concatenate([pages.nu, nu], axis=2), mass, first)

    def add_query_mass(self, pages: CompactPages, k, queries: ReferenceQueries, cfg: Config):
        batch, n_kv, _, d = k.shape
        q = np.asarray(queries.q, np.float64)
        group, window = q.shape[1] // n_kv, q.shape[2]
        positions = np.tile(np.arange(queries.end - window, queries.end), group)
        mass = _grown(pages.mass, k.shape[2])
        for b in range(batch):
            for g in range(n_kv):
                rows = q[b, g * group:(g + 1) * group].reshape(group * window, d)
                s, lse = fit.reference_scores(rows, positions, k[b, g], cfg.tau(d))
                mass[b, g] += np.exp(s - lse[:, None]).sum(axis=0)
        return CompactPages(pages.kappa, pages.beta, pages.nu, mass, pages.first_complete)

    def add_tail_mass(self, pages: CompactPages, q, k, lse, regions, tau):
        batch, n_q, d = q.shape
        n_kv = k.shape[1]
        q_g = q.reshape(batch, n_kv, n_q // n_kv, d)
        tail = slice(regions.mid_end, regions.n_tokens)
        scores = tau * np.einsum("bhgd,bhnd->bhgn", q_g, k[:, :, tail])
        mass = _grown(pages.mass, k.shape[2])
        mass[:, :, tail] += np.exp(scores - lse.reshape(batch, n_kv, -1)[..., None]).sum(axis=2)
        return CompactPages(pages.kappa, pages.beta, pages.nu, mass, pages.first_complete)

    # ------------------------------------------------------------ selection (SPEC 3, 8.2)

    def read_set(self, q, k, summary: Summary, plan, cfg: Config, tau: float) -> ReadSet:
        batch, n_q, d = q.shape
        n_kv = k.shape[1]
        r = plan.regions
        q_g = q.reshape(batch, n_kv, n_q // n_kv, d)
        chosen = [[self._select(q_g[b, g], k[b, g], summary, plan, cfg, tau, b, g) for g in range(n_kv)]
                  for b in range(batch)]
        return _read_set(chosen, r)

    @staticmethod
    def _select(q_group, k_head, summary: Summary, plan, cfg: Config, tau: float, b: int, g: int) -> np.ndarray:
        """Retrieved mid positions ``T`` (ascending) shared by the group's query heads."""
        r = plan.regions
        mid = np.arange(r.mid_start, r.mid_end)
        if plan.selection == "all":
            return mid
        if plan.selection == "exact":
            best = (tau * q_group @ k_head[mid].T).max(axis=0)
            return np.sort(mid[np.argsort(-best, kind="stable")[: plan.n_take]])
        if plan.selection == "page":
            kmin, kmax = summary.pages.kmin[b, g], summary.pages.kmax[b, g]  # [n_pages, d]
            bound = tau * np.maximum(q_group[:, None, :] * kmin[None], q_group[:, None, :] * kmax[None]).sum(-1)
            pages = summary.first_page + np.sort(np.argsort(-bound.max(axis=0), kind="stable")[: plan.n_take])
        else:  # compact: the best complete pages by l_p = tau q . kappa_p + beta_p, plus the partial pages
            cp = summary.pages
            score = tau * q_group @ cp.kappa[b, g].T + cp.beta[b, g]
            pages = cp.first_complete + np.sort(np.argsort(-score.max(axis=0), kind="stable")[: plan.n_take])
        size = cfg.page_size
        spans = [np.arange(max(p * size, r.mid_start), min((p + 1) * size, r.mid_end)) for p in pages]
        if plan.selection == "compact":
            first, n_pages = complete_pages(r.mid_start, r.mid_end, size)
            spans += [np.arange(r.mid_start, min(first * size, r.mid_end)),
                      np.arange(max(r.mid_start, (first + n_pages) * size), r.mid_end)]
        return np.sort(np.concatenate(spans)).astype(np.int64)

    # ------------------------------------------------------------ per-head budgets (SPEC 10)

    def unit_masses(self, q, k, summary: Summary, plan, cfg: Config, tau: float):
        return numpy_budget.unit_masses(q, k, summary, plan, cfg, tau)

    def units_read_set(self, units, summary: Summary, plan, cfg: Config) -> ReadSet:
        return _read_set(numpy_budget.units_tokens(units, summary, plan, cfg), plan.regions)

    # ------------------------------------------------------------ attention (SPEC 5)

    def attend(self, q, k, v, reads: ReadSet, ops, summary: Summary, cfg: Config, tau: float):
        batch, n_q, d = q.shape
        n_kv, dv = k.shape[1], v.shape[3]
        q_g = q.reshape(batch, n_kv, n_q // n_kv, d)
        valid = reads.idx >= 0
        safe = np.where(valid, reads.idx, 0)
        k_read = np.take_along_axis(k, safe[..., None], axis=2)
        v_read = np.take_along_axis(v, safe[..., None], axis=2)
        scores = np.where(valid[:, :, None], tau * np.einsum("bhgd,bhrd->bhgr", q_g, k_read), -np.inf)
        if ops is None:
            lam, n_phi, d_phi = np.full(scores.shape[:3], -np.inf), np.zeros((*scores.shape[:3], dv)), np.zeros(
                scores.shape[:3])
        else:
            retrieved = valid & (np.arange(reads.idx.shape[2]) >= reads.n_anchor)
            lam, n_phi, d_phi = ops.estimate(q_g, k_read, v_read, retrieved, reads, summary, cfg, tau)
        out, rho, lse = merge(scores, v_read, lam, n_phi, d_phi)
        return out.reshape(batch, n_q, dv), rho.reshape(batch, n_q), lse.reshape(batch, n_q)

    def dense(self, q, k, v, scale: float | None = None) -> np.ndarray:
        batch, n_q, n_kv, _, d, dv = check_shapes(q, k, v)
        tau = scale if scale is not None else d**-0.5
        q64 = np.asarray(q, np.float64).reshape(batch, n_kv, n_q // n_kv, d)
        scores = tau * np.einsum("bhgd,bhnd->bhgn", q64, np.asarray(k, np.float64))
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out = np.einsum("bhgn,bhnv->bhgv", p, np.asarray(v, np.float64)) / p.sum(axis=-1)[..., None]
        return out.reshape(batch, n_q, dv)

    def given_read_set(self, selected, plan) -> ReadSet:
        given = np.asarray(selected, dtype=np.int64)
        return _read_set([[np.sort(row[row >= 0]) for row in head] for head in given], plan.regions)


def merge(scores, v_read, lam, n_phi, d_phi):
    """SPEC 5's unnormalized merge: ``(out, rho, lse)`` per query head; no estimate where ``d_phi <= 0``."""
    keep = d_phi > 0  # never negative mass
    phi_log = np.where(keep, lam + np.log(np.where(keep, d_phi, 1.0)), -np.inf)
    m_star = np.maximum(scores.max(axis=-1), phi_log)
    p = np.exp(scores - m_star[..., None])
    w_phi = np.where(keep, np.exp(phi_log - m_star), 0.0)  # exp(lam - m*) d_phi
    num = p @ v_read + np.where(keep, w_phi / np.where(keep, d_phi, 1.0), 0.0)[..., None] * n_phi
    den = p.sum(axis=-1) + w_phi
    return num / den[..., None], w_phi / den, m_star + np.log(den)


def _read_set(chosen, regions) -> ReadSet:
    """Anchors (sink, then tail), then each head's ``T`` ascending, then -1 padding."""
    anchors = np.concatenate([np.arange(regions.sink_end), np.arange(regions.mid_end, regions.n_tokens)])
    width = max((len(t) for row in chosen for t in row), default=0)
    batch, n_kv = len(chosen), len(chosen[0])
    idx = np.full((batch, n_kv, anchors.size + width), -1, dtype=np.int64)
    idx[:, :, : anchors.size] = anchors
    n_sel = np.zeros((batch, n_kv), dtype=np.int64)
    for b in range(batch):
        for g in range(n_kv):
            idx[b, g, anchors.size: anchors.size + len(chosen[b][g])] = chosen[b][g]
            n_sel[b, g] = len(chosen[b][g])
    return ReadSet(idx, n_sel, int(anchors.size))


def _grown(mass: np.ndarray, n_tokens: int) -> np.ndarray:
    out = np.zeros((*mass.shape[:2], n_tokens))
    out[:, :, : mass.shape[2]] = mass
    return out


def _update_bounds(pages: PageBounds, mid_start: int, k, lo: int, hi: int, page_size: int) -> PageBounds:
    """kmin/kmax of every page touched by the newly folded positions ``[lo, hi)``."""
    first, n_pages = page_span(mid_start, hi, page_size)
    batch, n_kv, _, d = k.shape
    kmin, kmax = np.zeros((batch, n_kv, n_pages, d)), np.zeros((batch, n_kv, n_pages, d))
    kept = pages.kmin.shape[2]
    kmin[:, :, :kept], kmax[:, :, :kept] = pages.kmin, pages.kmax
    for p in range(max(lo // page_size, first), first + n_pages):
        keys = k[:, :, max(p * page_size, mid_start): min((p + 1) * page_size, hi)]
        kmin[:, :, p - first], kmax[:, :, p - first] = keys.min(axis=2), keys.max(axis=2)
    return PageBounds(kmin, kmax)
