"""Tensor ops of the torch backend: feature maps, page metadata, selection and the merge.

Every function is vectorized over ``[B, Hkv]`` and the query group; all accumulation is
float32 (SPEC section 1). Shapes are named as in the SPEC: ``G = Hq // Hkv``, ``R`` = read set.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from topkphi.step import NEG_INF, ReadSet

# ---------------------------------------------------------------- feature maps (SPEC 4)


def features(x: torch.Tensor, kind: str, w, b, norm_coef: float, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f [..., n, m], c [..., n])`` for float32 ``x [B,H,n,d]``, ``phi(x) = exp(c) * f``."""
    xt = x * math.sqrt(tau)
    if kind == "taylor2":
        outer = (xt[..., :, None] * xt[..., None, :]).flatten(-2) * (0.5**0.5)
        return torch.cat([torch.ones_like(xt[..., :1]), xt, outer], dim=-1), xt.new_zeros(xt.shape[:-1])
    logits = xt @ w.transpose(-1, -2) + b[:, None, :]  # [H',d,m] broadcasts over [B,H]
    if norm_coef:
        logits = logits - (0.5 * norm_coef) * (xt * xt).sum(-1, keepdim=True)
    c = logits.amax(-1)
    return torch.exp(logits - c[..., None]), c


def fold(s, z, c_max, f, c, v_new):
    """Fold tokens with features ``f [B,H,n,m]``, offsets ``c [B,H,n]`` and values ``v_new [B,H,n,dv]``
    (float32) into ``(s, z, c_max)``, rescaling by ``exp(C - C_new)`` when the offset grows."""
    c_new = torch.maximum(c_max, c.amax(-1))
    rescale = torch.exp(c_max - c_new)  # 0 for the empty state (C = -inf)
    w = torch.exp(c - c_new[..., None])[..., None] * f
    s = s * rescale[..., None, None] + w.transpose(-1, -2) @ v_new
    z = z * rescale[..., None] + w.sum(-2)
    return s, z, c_new


# ---------------------------------------------------------------- buffers with spare room


def extended(view: torch.Tensor, n: int, fill: float = 0.0) -> torch.Tensor:
    """``view [B,H,n0,...]`` as a prefix view of length ``n >= n0`` along dim 2.

    Written in place behind the view where its buffer has room (appends then cost O(new)); else a
    buffer of twice the room, ``fill`` beyond the copied prefix. The old view stays a prefix of it."""
    buf = view._base if is_prefix_view(view) else view
    if buf.shape[2] < n:
        grown = buf.new_full((*buf.shape[:2], max(n + 16, 2 * buf.shape[2]), *buf.shape[3:]), fill)
        grown[:, :, : view.shape[2]] = view
        buf = grown
    return buf[:, :, :n]


def spare(lead: tuple, n: int, trail: tuple, device, dtype: torch.dtype, fill: float = 0.0) -> torch.Tensor:
    """A ``fill``-ed prefix view ``[*lead, n, *trail]`` of a buffer with a quarter more room along dim 2."""
    cap = n + max(16, n // 4)
    return torch.full((*lead, cap, *trail), fill, dtype=dtype, device=device)[:, :, :n]


def is_prefix_view(x: torch.Tensor) -> bool:
    base = x._base
    return (
        base is not None
        and base.dim() == x.dim()
        and base.shape[:2] == x.shape[:2]
        and base.shape[3:] == x.shape[3:]
        and base.storage_offset() == x.storage_offset()  # data_ptr() is 0 for an empty view
        and base.stride() == x.stride()
    )


def page_extrema(k: torch.Tensor, start: int, end: int, first_page: int, page_size: int):
    """``kmin, kmax [B,H,n,d]`` of the pages ``first_page ..`` over the keys ``k[:, :, start:end]``
    (``start >= first_page * page_size``): the segment is padded to whole pages with +-inf."""
    seg = k[:, :, start:end]
    front = start - first_page * page_size
    n_pages = (end - 1) // page_size - first_page + 1
    back = n_pages * page_size - front - (end - start)
    shape = (*seg.shape[:2], n_pages, page_size, seg.shape[-1])
    lo = torch.nn.functional.pad(seg, (0, 0, front, back), value=math.inf).reshape(shape).amin(3)
    hi = torch.nn.functional.pad(seg, (0, 0, front, back), value=NEG_INF).reshape(shape).amax(3)
    return lo, hi


# ---------------------------------------------------------------- selection (SPEC 3, 8.2)


def topk_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Mask ``[..., n]`` of the ``k`` largest entries of ``a [..., n]``, ties to the smaller index:
    everything above the k-th value, then the first tied entries in position order (no sort)."""
    thr = a.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = a > thr
    tied = a == thr
    need = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= need))


def topk_ascending(a: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[..., k]`` (ascending) of the ``k`` largest entries of ``a [..., n]``, ties to the
    smaller index (``topk_mask``'s entries in position order)."""
    n = a.shape[-1]
    pos = torch.arange(n, device=a.device)
    key = torch.where(topk_mask(a, k), pos, n)
    idx = key.topk(k, dim=-1, largest=False, sorted=True).values
    return torch.where(idx < n, idx, -1)  # only NaN scores leave holes


def exact_candidates(qf: torch.Tensor, k: torch.Tensor, mid_start: int, mid_end: int, tau: float) -> torch.Tensor:
    """``a [B,Hkv,n_mid]``: the group's best score per mid key; ``qf [B,Hkv,G,d]`` float32."""
    k_mid = k[:, :, mid_start:mid_end].to(torch.float32)
    return (qf @ k_mid.transpose(-1, -2)).amax(2) * tau


def page_bounds(qf: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, tau: float) -> torch.Tensor:
    """Quest bound ``u [B,Hkv,n_pages]``: ``sum_i max(q_i kmin_i, q_i kmax_i)`` split by the sign of q."""
    pos, neg = qf.clamp(min=0), qf.clamp(max=0)
    u = pos @ kmax.to(torch.float32).transpose(-1, -2) + neg @ kmin.to(torch.float32).transpose(-1, -2)
    return u.amax(2) * tau


def page_tokens(pages: torch.Tensor, page_size: int, mid_start: int, mid_end: int):
    """Tokens of absolute ``pages [B,H,p]`` (ascending) clipped to mid: ``(T [B,H,p*P] ascending,
    -1 padded; counts [B,H])``. Only the pages at the mid boundaries can be partial."""
    pos = pages[..., None] * page_size + torch.arange(page_size, device=pages.device)
    ok = (pos >= mid_start) & (pos < mid_end) & (pages[..., None] >= 0)
    return packed(torch.where(ok, pos, -1).flatten(-2))


def packed(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions ascending with -1 entries moved last, counts of the others)`` along the last axis."""
    big = torch.iinfo(torch.int64).max
    flat = torch.where(positions >= 0, positions, big).sort(-1).values
    return torch.where(flat == big, -1, flat), (positions >= 0).sum(-1)


# ---------------------------------------------------------------- the merge (SPEC 5)


class ReadRows(NamedTuple):
    """The read set's rows in float32: what ``attend`` and every estimator take (built by ``read_rows``)."""

    q_g: torch.Tensor  # [B,Hkv,G,d]
    k_read: torch.Tensor  # [B,Hkv,R,d]
    v_read: torch.Tensor  # [B,Hkv,R,dv]
    retrieved: torch.Tensor  # [B,Hkv,R] bool: a T entry (its share leaves the estimate)
    scores: torch.Tensor  # [B,Hkv,G,R], -inf on padding


def read_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reads: ReadSet, tau: float) -> ReadRows:
    batch, n_q, d = q.shape
    n_kv = k.shape[1]
    q_g = q.to(torch.float32).reshape(batch, n_kv, n_q // n_kv, d)
    k_read, v_read = gather_tokens(k, reads.idx), gather_tokens(v, reads.idx)
    valid = reads.idx >= 0
    scores = ((q_g @ k_read.transpose(-1, -2)) * tau).masked_fill(~valid[:, :, None], NEG_INF)
    retrieved = valid & (torch.arange(reads.idx.shape[-1], device=q.device) >= reads.n_anchor)
    return ReadRows(q_g, k_read, v_read, retrieved, scores)


class State(NamedTuple):
    """Unnormalized softmax state: mass ``exp(m) * l`` and weighted values ``exp(m) * acc``."""

    m: torch.Tensor  # [..., G]
    l: torch.Tensor  # [..., G]  # noqa: E741
    acc: torch.Tensor  # [..., G, dv]


def _exp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(a - b), 0 where a is -inf."""
    return torch.where(a == NEG_INF, 0.0, torch.exp(a - b))


def exact_state(scores: torch.Tensor, v_read: torch.Tensor) -> State:
    """State of the exactly read tokens: ``scores [B,Hkv,G,R]`` (-inf on padding), ``v_read [B,Hkv,R,dv]``."""
    m = scores.amax(-1)
    p = _exp_diff(scores, m[..., None])
    return State(m, p.sum(-1), p @ v_read)


def phi_state(lam: torch.Tensor, n_phi: torch.Tensor, d_phi: torch.Tensor) -> State:
    """State of an estimate ``exp(lam) * (n_phi, d_phi)``; none where ``d_phi <= 0``."""
    keep = d_phi > 0
    safe = torch.where(keep, d_phi, 1.0)
    m = torch.where(keep, lam + torch.log(safe), NEG_INF)
    return State(m, keep.to(d_phi.dtype), torch.where(keep[..., None], n_phi / safe[..., None], 0.0))


def state_merge(a: State, b: State) -> State:
    m = torch.maximum(a.m, b.m)
    wa, wb = _exp_diff(a.m, m), _exp_diff(b.m, m)
    return State(m, a.l * wa + b.l * wb, a.acc * wa[..., None] + b.acc * wb[..., None])


def state_normalize(s: State) -> torch.Tensor:
    return s.acc / s.l[..., None]


def state_lse(s: State) -> torch.Tensor:
    """Log of the state's softmax normalizer (the step's ``lse``)."""
    return s.m + torch.log(s.l)


def mass_fraction(part: State, whole: State) -> torch.Tensor:
    """Share of ``whole``'s mass that ``part`` holds (rho when ``part`` is the estimate)."""
    return part.l * _exp_diff(part.m, whole.m) / whole.l


def logit_sums(logit: torch.Tensor, values: torch.Tensor):
    """``(lam, n_phi, d_phi)`` of ``sum_c exp(logit_c) * (values_c, 1)``: ``logit [B,H,G,C]`` (-inf
    where a term is absent), ``values [B,H,C,dv]``; ``d_phi = 0`` where every term is absent."""
    lam = logit.amax(-1)
    w = _exp_diff(logit, torch.where(lam == NEG_INF, 0.0, lam)[..., None])
    return lam, w @ values, w.sum(-1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``x[b, h, idx[b, h, r]]`` as float32 ``[B,H,R,e]``; -1 entries read row 0 (masked later)."""
    safe = idx.clamp(min=0)[..., None].expand(-1, -1, -1, x.shape[-1])
    return torch.gather(x, 2, safe).to(torch.float32)
