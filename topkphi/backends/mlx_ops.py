"""Pure-MLX building blocks of the MLX backend: feature maps, summary folding, selection, the merge.

Every function is vectorized over ``[B, Hkv, G]`` and accumulates in float32 (SPEC section 1);
it runs on any MLX device. The Metal kernel (``topkphi/kernels/metal_decode.py``) replaces
``attend`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

# a finite stand-in for -inf where inf arithmetic would make NaN (max of nothing)
NEG_BIG = -1e30


@dataclass(frozen=True)
class MapParams:
    """A ``FeatureMap`` as float32 MLX arrays, converted once per map (see ``MLXBackend``).

    Exp-linear maps: ``w_q, w_k [H', m, d]``, ``b_q, b_k [H', m]``;
    ``H'`` is 1 (shared by all KV heads) or ``Hkv``. ``taylor2`` has no parameters.
    """

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
    f = mx.exp(logits - top[..., None])
    c = top - p.norm_coef * 0.5 * mx.sum(x_t * x_t, axis=-1)
    return f, c


def fold(s, z, c_max, k_new, v_new, p: MapParams, tau: float):
    """Fold ``k_new [B,H,n,d]``, ``v_new [B,H,n,dv]`` (n >= 1) into ``(S, z, C)``; rescale by exp(C - C_new)."""
    f, c = features(k_new.astype(mx.float32), p, "k", tau)
    c_new = mx.maximum(c_max, c.max(axis=-1))
    rescale = mx.exp(c_max - c_new)  # exp(-inf) = 0 clears the empty state
    w = mx.exp(c - c_new[..., None])[..., None] * f  # [B,H,n,m]
    s = s * rescale[..., None, None] + w.swapaxes(-1, -2) @ v_new.astype(mx.float32)
    z = z * rescale[..., None] + w.sum(axis=2)
    return s, z, c_new


def fold_pages(kmin, kmax, k, lo: int, hi: int, mid_start: int, page_size: int):
    """Page kmin/kmax after folding positions ``[lo, hi)`` of ``k [B,H,N,d]`` (pages by absolute position).

    Only the new keys are read; the page that held the previous end is merged with its old bounds.
    """
    first = mid_start // page_size
    p_lo, p_hi = lo // page_size, (hi - 1) // page_size + 1
    start = p_lo * page_size  # pad the first touched page back to its boundary
    batch, heads, _, d = k.shape
    k_new = k[:, :, lo:hi].astype(mx.float32)
    n_new = p_hi - p_lo

    def padded(fill: float) -> mx.array:
        front = mx.full((batch, heads, lo - start, d), fill, dtype=mx.float32)
        back = mx.full((batch, heads, p_hi * page_size - hi, d), fill, dtype=mx.float32)
        return mx.concatenate([front, k_new, back], axis=2).reshape(batch, heads, n_new, page_size, d)

    new_min, new_max = padded(float("inf")).min(axis=3), padded(-float("inf")).max(axis=3)
    kept = kmin.shape[2]
    overlap = kept - (p_lo - first)  # 0 or 1: the partially folded page, merged with its old bounds
    if overlap > 0:
        new_min = mx.concatenate([mx.minimum(new_min[:, :, :1], kmin[:, :, -1:]), new_min[:, :, 1:]], axis=2)
        new_max = mx.concatenate([mx.maximum(new_max[:, :, :1], kmax[:, :, -1:]), new_max[:, :, 1:]], axis=2)
    keep = kept - max(overlap, 0)
    return (mx.concatenate([kmin[:, :, :keep], new_min], axis=2),
            mx.concatenate([kmax[:, :, :keep], new_max], axis=2))


def compact(values: mx.array, mask: mx.array, width: int) -> mx.array:
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
    idx = mx.argpartition(-score, kth=n_take - 1, axis=-1)[..., :n_take]
    cut = mx.take_along_axis(score, idx, axis=-1).min(axis=-1, keepdims=True)
    above = score > cut
    tied = score == cut
    room = n_take - above.astype(mx.int32).sum(axis=-1, keepdims=True)
    return above | (tied & (mx.cumsum(tied.astype(mx.int32), axis=-1) <= room))


def select_exact(q_g: mx.array, k: mx.array, mid_start: int, mid_end: int, n_take: int, tau: float):
    """``(selected [B,H,n_take] ascending, n_selected [B,H])``: best keys by their group's max score."""
    k_mid = k[:, :, mid_start:mid_end].astype(mx.float32)
    best = (tau * (q_g @ k_mid.swapaxes(-1, -2))).max(axis=2)  # [B,H,n_mid]
    mask = top_mask(best, n_take)
    positions = mx.arange(mid_start, mid_end, dtype=mx.int32)
    return compact(positions, mask, n_take), mx.full(best.shape[:2], n_take, dtype=mx.int32)


def select_pages(q_g, kmin, kmax, first_page: int, mid_start: int, mid_end: int, page_size: int,
                 n_take: int, tau: float):
    """Quest page selection: ``(selected [B,H,W] ascending, -1 padded, n_selected [B,H])``."""
    # sum_i max(q_i kmin_i, q_i kmax_i) = relu(q) . kmax + min(q, 0) . kmin: two matmuls
    bound = mx.maximum(q_g, 0.0) @ kmax.swapaxes(-1, -2) + mx.minimum(q_g, 0.0) @ kmin.swapaxes(-1, -2)
    best = (tau * bound).max(axis=2)  # [B,H,n_pages]
    n_pages = best.shape[-1]
    pages = compact(mx.arange(first_page, first_page + n_pages, dtype=mx.int32), top_mask(best, n_take), n_take)
    pos = (pages[..., None] * page_size + mx.arange(page_size, dtype=mx.int32)).reshape(*pages.shape[:2], -1)
    valid = (pos >= mid_start) & (pos < mid_end)
    width = min(n_take * page_size, mid_end - mid_start)
    return compact(pos, valid, width), valid.astype(mx.int32).sum(axis=-1)


def attend(q_g, k, v, read_idx, tau: float, mid_start: int, mid_end: int, phi=None):
    """SPEC section 5 over the read set: ``(out [B,H,G,dv] float32, rho [B,H,G] float32)``.

    ``q_g [B,H,G,d]`` float32; ``read_idx [B,H,R]`` int32 positions, -1 = unused slot; positions
    inside ``[mid_start, mid_end)`` are the retrieved T. ``phi`` is None (Top-K only) or
    ``(params, S [B,H,m,dv], z [B,H,m], C [B,H], complete [B,H] bool)``.
    """
    used = read_idx >= 0
    safe = mx.where(used, read_idx, 0)[..., None]
    k_r = mx.take_along_axis(k, safe, axis=2).astype(mx.float32)  # [B,H,R,d]
    v_r = mx.take_along_axis(v, safe, axis=2).astype(mx.float32)
    scores = mx.where(used[:, :, None, :], tau * (q_g @ k_r.swapaxes(-1, -2)), -float("inf"))  # [B,H,G,R]
    m_exact = mx.maximum(scores.max(axis=-1), NEG_BIG)
    if phi is None:
        p = mx.exp(scores - m_exact[..., None])
        num, den = p @ v_r, p.sum(axis=-1)
        return num / den[..., None], mx.zeros(den.shape, dtype=mx.float32)
    params, s_sum, z_sum, c_big, complete = phi
    f_q, c_q = features(q_g, params, "q", tau)  # [B,H,G,m]
    f_k, c_k = features(k_r, params, "k", tau)  # [B,H,R,m]
    retrieved = used & (read_idx >= mid_start) & (read_idx < mid_end) & complete[..., None]
    c_ref = mx.where(complete, c_big, 0.0)[..., None]  # an empty summary has C = -inf
    w_t = mx.where(retrieved, mx.exp(c_k - c_ref), 0.0)[..., None] * f_k  # as folded into S, z
    share = f_q @ w_t.swapaxes(-1, -2)  # [B,H,G,R]: the retrieved tokens' estimated share
    n_phi = f_q @ s_sum - share @ v_r  # [B,H,G,dv]
    d_phi = (f_q * z_sum[:, :, None, :]).sum(axis=-1) - share.sum(axis=-1)
    keep = complete[..., None] & (d_phi > 0)  # never negative mass
    d_safe = mx.where(keep, d_phi, 1.0)
    phi_log = mx.where(keep, c_q + c_ref + mx.log(d_safe), NEG_BIG)  # log of the phi mass
    m_star = mx.maximum(m_exact, phi_log)
    p = mx.exp(scores - m_star[..., None])
    w_phi = mx.where(keep, mx.exp(phi_log - m_star), 0.0)  # = exp(lam - m*) d_phi, never overflows
    num = p @ v_r + w_phi[..., None] * (n_phi / d_safe[..., None])
    den = p.sum(axis=-1) + w_phi
    return num / den[..., None], w_phi / den
