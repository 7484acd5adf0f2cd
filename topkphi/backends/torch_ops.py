"""Tensor ops of the torch backend: feature maps, summary folding, selection and the merge.

Every function is vectorized over ``[B, Hkv]`` and the query group; all accumulation is
float32 (SPEC section 1). Shapes are named as in the SPEC: ``G = Hq // Hkv``, ``R`` = read set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

NEG_INF = float("-inf")


@dataclass
class ReadSet:
    """The tokens one decode step reads exactly, per KV head (what ``select`` hands ``attend``).

    ``idx [B,Hkv,R]`` int64 absolute positions: the ``n_anchor`` sink+tail anchors first (the
    same for every head), then the retrieved mid tokens ``T`` ascending, then ``-1`` padding.
    ``n_read [B,Hkv]`` counts the valid entries, ``n_selected [B,Hkv]`` those in ``T``;
    ``covers_mid``: ``T`` is all of mid, so the step is exact attention and skips the summary.
    """

    idx: torch.Tensor
    n_read: torch.Tensor
    n_selected: torch.Tensor
    n_anchor: int
    covers_mid: bool = False

    @property
    def selected(self) -> torch.Tensor:
        """``T [B,Hkv,R - n_anchor]``, ascending, -1 padded (a view of ``idx``)."""
        return self.idx[..., self.n_anchor :]

    @property
    def valid(self) -> torch.Tensor:
        return self.idx >= 0

    @property
    def retrieved(self) -> torch.Tensor:
        """``[B,Hkv,R]`` bool: the entry is a retrieved mid token (its share leaves the summary)."""
        pos = torch.arange(self.idx.shape[-1], device=self.idx.device)
        return (pos >= self.n_anchor) & self.valid


@dataclass
class PhiTensors:
    """One layer's feature map and summary on the decode device, float32.

    ``w_q, w_k [H',m,d]``, ``b_q, b_k [H',m]`` (``H'`` in ``{1, Hkv}``; None for taylor2);
    ``s [B,Hkv,m,dv]``, ``z [B,Hkv,m]``, ``c_max [B,Hkv]``; ``active [B,Hkv]`` bool: the
    head's read set leaves part of mid unread, so the completion applies there.
    """

    kind: str
    norm_coef: float
    w_q: torch.Tensor | None
    b_q: torch.Tensor | None
    w_k: torch.Tensor | None
    b_k: torch.Tensor | None
    s: torch.Tensor
    z: torch.Tensor
    c_max: torch.Tensor
    active: torch.Tensor


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


def grow_pages(buf: torch.Tensor, n_used: int, n_needed: int) -> torch.Tensor:
    """A page buffer ``[B,H,cap,d]`` with room for ``n_needed`` pages, keeping the first ``n_used``."""
    if buf.shape[2] >= n_needed:
        return buf
    cap = max(n_needed + 16, 2 * buf.shape[2])
    out = buf.new_empty((*buf.shape[:2], cap, buf.shape[3]))
    out[:, :, :n_used] = buf[:, :, :n_used]
    return out


# ---------------------------------------------------------------- selection (SPEC 3)


def topk_ascending(a: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[..., k]`` (ascending) of the ``k`` largest entries of ``a [..., n]``, ties to the
    smaller index: everything above the k-th value, then the first tied entries in position order."""
    n = a.shape[-1]
    thr = a.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = a > thr
    tied = a == thr
    need = k - above.sum(-1, keepdim=True)
    take = above | (tied & (tied.cumsum(-1) <= need))
    pos = torch.arange(n, device=a.device)
    key = torch.where(take, pos, n)
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
    big = torch.iinfo(torch.int64).max
    flat = torch.where(ok, pos, big).flatten(-2).sort(-1).values
    return torch.where(flat == big, -1, flat), ok.sum((-1, -2))


# ---------------------------------------------------------------- the merge (SPEC 5)


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
    """State of the summary's estimate ``exp(lam) * (n_phi, d_phi)``; none where ``d_phi <= 0``."""
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


def mass_fraction(part: State, whole: State) -> torch.Tensor:
    """Share of ``whole``'s mass that ``part`` holds (rho when ``part`` is the estimate)."""
    return part.l * _exp_diff(part.m, whole.m) / whole.l


def phi_completion(qf, scores, k_read, v_read, retrieved, phi: PhiTensors, tau: float):
    """``(lam, n_phi, d_phi)`` per query head (SPEC 5): the summary's estimate minus the share of
    the retrieved tokens, recomputed from the keys already read. ``qf [B,Hkv,G,d]``."""
    f_q, c_q = features(qf, phi.kind, phi.w_q, phi.b_q, phi.norm_coef, tau)  # [B,Hkv,G,m]
    c_big = phi.c_max[..., None]  # [B,Hkv,1]
    if phi.kind == "taylor2":  # f_q . f_k = 1 + s + s^2 / 2 and c = 0: the scores suffice
        share = torch.where(retrieved[:, :, None], 1 + scores + 0.5 * scores * scores, 0.0)
    else:
        f_k, c_k = features(k_read, phi.kind, phi.w_k, phi.b_k, phi.norm_coef, tau)  # [B,Hkv,R,m]
        w_t = torch.where(retrieved, torch.exp(c_k - c_big), 0.0)[..., None] * f_k
        share = f_q @ w_t.transpose(-1, -2)  # [B,Hkv,G,R]
    n_phi = f_q @ phi.s - share @ v_read
    d_phi = (f_q @ phi.z[..., None])[..., 0] - share.sum(-1)
    d_phi = torch.where(phi.active[..., None], d_phi, 0.0)
    return c_q + c_big, n_phi, d_phi


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``x[b, h, idx[b, h, r]]`` as float32 ``[B,H,R,e]``; -1 entries read row 0 (masked later)."""
    safe = idx.clamp(min=0)[..., None].expand(-1, -1, -1, x.shape[-1])
    return torch.gather(x, 2, safe).to(torch.float32)
