"""The oracle's primitives of the per-head budgets (SPEC 10); the rule itself is ``topkphi.budget``."""

from __future__ import annotations

import numpy as np

from topkphi.budget import ArrayOps, fragments, page_sizes
from topkphi.config import Config
from topkphi.step import StepPlan
from topkphi.summary import Summary


class NumpyArrayOps(ArrayOps):
    def exp(self, x):
        with np.errstate(under="ignore"):
            return np.exp(x)

    def log(self, x):
        with np.errstate(divide="ignore"):
            return np.log(x)

    def logsumexp(self, x):
        top = x.max(axis=-1, keepdims=True) if x.shape[-1] else np.full((*x.shape[:-1], 1), -np.inf)
        safe = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            return (safe + np.log(np.exp(x - safe).sum(axis=-1, keepdims=True)))[..., 0]

    def amax(self, x, axis):
        return x.max(axis=axis)

    def argsort(self, x):
        return np.argsort(x, axis=-1, kind="stable")

    def take(self, x, idx):
        shape = np.broadcast_shapes(x.shape[:-1], idx.shape[:-1])
        return np.take_along_axis(np.broadcast_to(x, (*shape, x.shape[-1])),
                                  np.broadcast_to(idx, (*shape, idx.shape[-1])), axis=-1)

    def cumsum(self, x):
        return np.cumsum(x, axis=-1)

    def flip(self, x):
        return np.flip(x, axis=-1)

    def count(self, mask):
        return mask.sum(axis=-1).astype(np.int64)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def clip(self, x, lo, hi):
        return np.clip(x, lo, hi)

    def arange(self, n, like):
        return np.arange(n)


def unit_masses(q, k, summary: Summary, plan: StepPlan, cfg: Config, tau: float):
    """``(logm [B,Hkv,G,U], anchor [B,Hkv,G])`` in float64 (see ``Backend.unit_masses``)."""
    batch, n_q, d = q.shape
    n_kv = k.shape[1]
    r = plan.regions
    q_g = q.reshape(batch, n_kv, n_q // n_kv, d)
    exact = [*range(r.sink_end), *range(r.mid_end, r.n_tokens)]
    if plan.selection == "exact":
        logm = tau * np.einsum("bhgd,bhnd->bhgn", q_g, k[:, :, r.mid_start:r.mid_end])
    elif plan.selection == "page":
        kmin, kmax = summary.pages.kmin, summary.pages.kmax
        bound = np.maximum(q_g[:, :, :, None] * kmin[:, :, None], q_g[:, :, :, None] * kmax[:, :, None]).sum(-1)
        sizes = page_sizes(summary.first_page, kmin.shape[2], cfg.page_size, r.mid_start, r.mid_end)
        with np.errstate(divide="ignore"):
            logm = tau * bound + np.log(np.asarray(sizes, np.float64))
    else:
        cp = summary.pages
        logm = tau * np.einsum("bhgd,bhpd->bhgp", q_g, cp.kappa) + cp.beta[:, :, None]
        front, back = fragments(r.mid_start, r.mid_end, cfg.page_size)
        exact += [*front, *back]
    scores = tau * np.einsum("bhgd,bhnd->bhgn", q_g, k[:, :, exact])
    return logm, NumpyArrayOps().logsumexp(scores)


def units_tokens(units, summary: Summary, plan: StepPlan, cfg: Config) -> list[list[np.ndarray]]:
    """Each head's retrieved positions ``T`` (ascending) for chosen ``units [B,Hkv,W]``."""
    r, size = plan.regions, cfg.page_size
    extra = np.zeros(0, np.int64)
    if plan.selection == "compact":
        extra = np.asarray([*fragments(r.mid_start, r.mid_end, size)[0], *fragments(r.mid_start, r.mid_end, size)[1]],
                           np.int64)
    first = summary.first_page if plan.selection == "page" else getattr(summary.pages, "first_complete", 0)
    out = []
    for row in units:
        heads = []
        for head in row:
            taken = head[head >= 0]
            if plan.selection == "exact":
                tokens = taken + r.mid_start
            else:
                spans = [np.arange(max((first + u) * size, r.mid_start), min((first + u + 1) * size, r.mid_end))
                         for u in taken]
                tokens = np.concatenate([np.zeros(0, np.int64), *spans])
            heads.append(np.sort(np.concatenate([tokens, extra])).astype(np.int64))
        out.append(heads)
    return out
