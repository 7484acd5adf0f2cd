"""Pure-MLX building blocks shared by the MLX backend's files: gathers, masks, and attention states.

An attention state ``AttnState(m, mass, acc, est)`` (the ``(m, l, acc)`` of flash attention) is
the unnormalized form of SPEC 5: over ``[B,Hkv,G]`` it stands for the mass ``exp(m) * mass`` and
the numerator ``exp(m) * acc``; ``est`` is the part of ``mass`` that was estimated (not read
exactly). States merge with ``merge``, so the exact read set, an estimator and a kernel's output
combine in any order. Everything is float32.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

# a finite stand-in for -inf where inf arithmetic would make NaN (max of nothing)
NEG_BIG = -1e30


def f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def gather_rows(x: mx.array, idx: mx.array) -> mx.array:
    """``x [B,H,N,e]`` rows at ``idx [B,H,R]`` (-1 reads row 0; mask it), as float32 ``[B,H,R,e]``."""
    safe = mx.where(idx >= 0, idx, 0)[..., None]
    return f32(mx.take_along_axis(x, safe, axis=2))


def grown(x: mx.array, n: int, fill) -> mx.array:
    """``x [B,H,L]`` with at least ``n`` entries on its last axis; new entries ``fill``.

    Always a new array object, so slice updates of the result leave ``x`` as it was; grows by
    doubling so that per-token appends copy O(1) entries on average."""
    length = x.shape[-1]
    if length >= n:
        return x[..., :]
    extra = max(n, 2 * length) - length
    return mx.concatenate([x, mx.full((*x.shape[:-1], extra), fill, dtype=x.dtype)], axis=-1)


def pack(values: mx.array, mask: mx.array, width: int) -> mx.array:
    """The ``values`` where ``mask``, in order, packed to the front of ``[..., width]``; -1 after them."""
    rank = mx.cumsum(mask.astype(mx.int32), axis=-1) - 1
    target = mx.where(mask, rank, width)  # unmasked entries land in a dump column, cut below
    out = mx.full((*mask.shape[:-1], width + 1), -1, dtype=mx.int32)
    values = mx.broadcast_to(values.astype(mx.int32), mask.shape)
    return mx.put_along_axis(out, target, values, axis=-1)[..., :width]


def top_mask(score: mx.array, n_take: int) -> mx.array:
    """Mask of the ``n_take`` largest entries along the last axis, ties to the smaller index (SPEC 3)."""
    if n_take >= score.shape[-1]:
        return mx.ones(score.shape, dtype=mx.bool_)
    if n_take <= 0:
        return mx.zeros(score.shape, dtype=mx.bool_)
    idx = mx.argpartition(-score, kth=n_take - 1, axis=-1)[..., :n_take]
    cut = mx.take_along_axis(score, idx, axis=-1).min(axis=-1, keepdims=True)
    above = score > cut
    tied = score == cut
    room = n_take - above.astype(mx.int32).sum(axis=-1, keepdims=True)
    return above | (tied & (mx.cumsum(tied.astype(mx.int32), axis=-1) <= room))


def onehot(labels: mx.array, n_classes: int, where: mx.array | None = None) -> mx.array:
    """float32 ``[..., n, n_classes]``; labels outside ``[0, n_classes)`` (and not ``where``) are zero rows."""
    hot = labels[..., None] == mx.arange(n_classes, dtype=labels.dtype)
    if where is not None:
        hot = hot & where[..., None]
    return hot.astype(mx.float32)


def reference_scores(rows: mx.array, positions: mx.array, k: mx.array, tau: float) -> tuple[mx.array, mx.array]:
    """``(s [B,H,R,N], lse [B,H,R])``: scores of reference rows ``rows [B,H,R,d]`` at absolute
    ``positions [R]`` over ``k [B,H,N,d]``, -inf where causality forbids, and each row's log-partition."""
    s = tau * (rows @ f32(k).swapaxes(-1, -2))
    allowed = mx.arange(k.shape[2])[None, :] <= positions[:, None]
    s = mx.where(allowed, s, -float("inf"))
    top = s.max(axis=-1)
    return s, top + mx.log(mx.exp(s - top[..., None]).sum(axis=-1))


def reference_rows(q, n_kv: int) -> mx.array:
    """``[B,Hq,W,d]`` reference queries (MLX or NumPy) as float32 ``[B,Hkv,G*W,d]`` rows, head-major
    in the group."""
    q = q if isinstance(q, mx.array) else mx.array(q)  # NumPy float64 becomes float32
    batch, n_q, window, d = q.shape
    return f32(q).reshape(batch, n_kv, (n_q // n_kv) * window, d)


class AttnState(NamedTuple):
    """Unnormalized attention over ``[B,H,G]`` (see the module doc)."""

    m: mx.array  # [B,H,G] running max (log scale), NEG_BIG where empty
    mass: mx.array  # [B,H,G] mass / exp(m)
    acc: mx.array  # [B,H,G,dv] numerator / exp(m)
    est: mx.array  # [B,H,G] estimated part of mass


def exact_state(scores: mx.array, v_read: mx.array) -> AttnState:
    """The read set's state: ``scores [B,H,G,R]`` (-inf at unused slots), ``v_read [B,H,R,dv]``."""
    m = mx.maximum(scores.max(axis=-1), NEG_BIG)
    p = mx.exp(scores - m[..., None])
    mass = p.sum(axis=-1)
    return AttnState(m, mass, p @ v_read, mx.zeros_like(mass))


def estimate_state(lam: mx.array, n_phi: mx.array, d_phi: mx.array) -> AttnState:
    """An estimator's ``(lam, n_phi, d_phi)`` as a state, normalized so nothing overflows:
    ``m = lam + log d_phi``, ``mass = 1``, ``acc = n_phi / d_phi``; empty where ``d_phi <= 0``."""
    keep = d_phi > 0  # never negative mass
    d_safe = mx.where(keep, d_phi, 1.0)
    m = mx.where(keep, lam + mx.log(d_safe), NEG_BIG)
    one = keep.astype(mx.float32)
    return AttnState(m, one, mx.where(keep[..., None], n_phi / d_safe[..., None], 0.0), one)


def normalized_state(out: mx.array, lse: mx.array, rho: mx.array) -> AttnState:
    """A finished attention ``(out, lse, rho)`` as a state again: what a kernel returns."""
    return AttnState(lse, mx.ones_like(lse), f32(out), rho)


def merge(a: AttnState, b: AttnState) -> AttnState:
    """The state of the union of two disjoint token sets."""
    m = mx.maximum(a.m, b.m)
    wa, wb = mx.exp(a.m - m), mx.exp(b.m - m)
    return AttnState(m, wa * a.mass + wb * b.mass, wa[..., None] * a.acc + wb[..., None] * b.acc,
                     wa * a.est + wb * b.est)


def finish(state: AttnState) -> tuple[mx.array, mx.array, mx.array]:
    """``(out [B,H,G,dv], rho [B,H,G], lse [B,H,G])``: the one normalization of SPEC 5."""
    return state.acc / state.mass[..., None], state.est / state.mass, state.m + mx.log(state.mass)
