"""The MLX primitives of the per-head budgets (SPEC 10), float32; the rule is ``topkphi.budget``.

MLX's argsort is a merge sort (stable); ``tests/backends/test_budget.py`` checks ties against the oracle."""

from __future__ import annotations

import math

import mlx.core as mx

from topkphi.backends.mlx_ops import f32, pack
from topkphi.budget import ArrayOps, fragments, page_sizes
from topkphi.config import Config
from topkphi.step import ReadSet, StepPlan
from topkphi.summary import Summary


class MLXArrayOps(ArrayOps):
    def exp(self, x):
        return mx.exp(x)

    def log(self, x):
        return mx.log(x)

    def logsumexp(self, x):
        return mx.logsumexp(x, axis=-1)

    def amax(self, x, axis):
        return x.max(axis=axis)

    def argsort(self, x):
        return mx.argsort(x, axis=-1).astype(mx.int32)

    def take(self, x, idx):
        shape = tuple(max(a, b) for a, b in zip(x.shape[:-1], idx.shape[:-1]))
        return mx.take_along_axis(mx.broadcast_to(x, (*shape, x.shape[-1])),
                                  mx.broadcast_to(idx, (*shape, idx.shape[-1])), axis=-1)

    def cumsum(self, x):
        return mx.cumsum(x, axis=-1)

    def flip(self, x):
        return x[..., ::-1]

    def count(self, mask):
        return mask.astype(mx.int32).sum(axis=-1)

    def where(self, cond, a, b):
        return mx.where(cond, a, b)

    def clip(self, x, lo, hi):
        return mx.clip(x, lo, hi)

    def arange(self, n, like):
        return mx.arange(n, dtype=mx.int32)


def unit_masses(q: mx.array, k: mx.array, summary: Summary, plan: StepPlan, cfg: Config, tau: float):
    """``(logm [B,Hkv,G,U], anchor [B,Hkv,G])`` float32 (see ``Backend.unit_masses``)."""
    batch, n_q, d = q.shape
    n_kv = k.shape[1]
    r = plan.regions
    q_g = f32(q).reshape(batch, n_kv, n_q // n_kv, d)
    exact = [*range(r.sink_end), *range(r.mid_end, r.n_tokens)]
    if plan.selection == "exact":
        logm = tau * (q_g @ f32(k[:, :, r.mid_start:r.mid_end]).swapaxes(-1, -2))
    elif plan.selection == "page":
        kmin, kmax = f32(summary.pages.kmin), f32(summary.pages.kmax)
        bound = mx.maximum(q_g, 0.0) @ kmax.swapaxes(-1, -2) + mx.minimum(q_g, 0.0) @ kmin.swapaxes(-1, -2)
        sizes = page_sizes(summary.first_page, kmin.shape[2], cfg.page_size, r.mid_start, r.mid_end)
        logm = tau * bound + mx.array([math.log(n) if n else -math.inf for n in sizes], dtype=mx.float32)
    else:
        cp = summary.pages
        logm = tau * (q_g @ f32(cp.kappa).swapaxes(-1, -2)) + f32(cp.beta)[:, :, None, :]
        front, back = fragments(r.mid_start, r.mid_end, cfg.page_size)
        exact += [*front, *back]
    k_exact = f32(k[:, :, mx.array(exact, dtype=mx.int32)]) if exact else mx.zeros((batch, n_kv, 0, d))
    return logm, mx.logsumexp(tau * (q_g @ k_exact.swapaxes(-1, -2)), axis=-1)


def units_read_set(units: mx.array, summary: Summary, plan: StepPlan, cfg: Config) -> ReadSet:
    """The read set of chosen ``units [B,Hkv,W]`` (ascending, -1 padded), in the layout of ``topkphi.step``."""
    r, size = plan.regions, cfg.page_size
    batch, n_kv, width = units.shape
    if plan.selection == "exact":
        pos, valid = units + r.mid_start, units >= 0
    else:
        first = summary.first_page if plan.selection == "page" else summary.pages.first_complete
        pos = ((units[..., None] + first) * size + mx.arange(size, dtype=mx.int32)).reshape(batch, n_kv, -1)
        valid = mx.repeat(units >= 0, size, axis=-1) & (pos >= r.mid_start) & (pos < r.mid_end)
    if plan.selection == "compact":
        front, back = fragments(r.mid_start, r.mid_end, size)
        extra = mx.broadcast_to(mx.array([*front, *back], dtype=mx.int32), (batch, n_kv, len(front) + len(back)))
        pos, valid = mx.concatenate([pos, extra], axis=-1), mx.concatenate([valid, mx.ones(extra.shape, mx.bool_)], -1)
    big = r.n_tokens  # sort the valid positions ascending, invalid ones last
    ordered = mx.sort(mx.where(valid, pos, big), axis=-1)
    selected = pack(ordered, ordered < big, pos.shape[-1])
    anchors = mx.concatenate([mx.arange(0, r.sink_end, dtype=mx.int32),
                              mx.arange(r.mid_end, r.n_tokens, dtype=mx.int32)])
    idx = mx.concatenate([mx.broadcast_to(anchors, (batch, n_kv, anchors.size)), selected], axis=2)
    return ReadSet(idx, valid.astype(mx.int32).sum(axis=-1), int(r.n_anchor))
