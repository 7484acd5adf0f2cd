"""Launcher of the fused decode (kernels in ``kernels/decode.py``, ``kernels/merge.py``).

``fused_decode`` runs SPEC section 5 on a given read set in one pass over the gathered keys and
values: input checks, allocation, grid and split-K. The caller chooses the read set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from topkphi.triton.kernels.decode import decode_kernel
from topkphi.triton.kernels.merge import merge_kernel
from topkphi.triton.launch import interpreting, n_sms, p2

NEG_INF = float("-inf")


@dataclass
class FeatureMapInputs:
    """An exp-linear feature map and its summary (SPEC 4), as the kernel reads them.

    ``w_q, w_k [H', m, d]``, ``b_q, b_k [H', m]`` with ``H'`` in ``{1, Hkv}``, any float dtype
    (contiguous); ``norm_coef`` as in ``FeatureMap`` (1 for prf, 0 for learned); ``s [B,Hkv,m,dv]``,
    ``z [B,Hkv,m]``, ``c_max [B,Hkv]`` (the summary's C; -inf marks an empty summary): pass them fp32
    contiguous to avoid a copy per call. The first ``n_anchor`` entries of ``read_idx`` are sink and
    tail anchors; the rest are the retrieved T, whose estimated share leaves the summary.
    """

    w_q: torch.Tensor
    b_q: torch.Tensor
    w_k: torch.Tensor
    b_k: torch.Tensor
    norm_coef: float
    s: torch.Tensor
    z: torch.Tensor
    c_max: torch.Tensor
    n_anchor: int


@dataclass
class Estimate:
    """An estimate of the unread mid computed outside the kernel, one unnormalized state per query head:
    mass ``exp(log_mass)`` with normalized values ``value``. ``log_mass [B,Hq]`` fp32 (-inf: none),
    ``value [B,Hq,dv]`` fp32 (0 where there is none)."""

    log_mass: torch.Tensor
    value: torch.Tensor

    @classmethod
    def of(cls, lam: torch.Tensor, n_phi: torch.Tensor, d_phi: torch.Tensor) -> Estimate:
        """From an estimator's ``exp(lam) * (n_phi, d_phi)``: ``lam, d_phi [B,Hkv,G]``, ``n_phi [B,Hkv,G,dv]``;
        nothing where ``d_phi <= 0`` (SPEC 5: never negative mass)."""
        batch, n_kv, group = lam.shape
        lam, n_phi, d_phi = (x.to(torch.float32) for x in (lam, n_phi, d_phi))
        keep = d_phi > 0
        safe = torch.where(keep, d_phi, 1.0)
        log_mass = torch.where(keep, lam + torch.log(safe), NEG_INF)
        value = torch.where(keep[..., None], n_phi / safe[..., None], 0.0)
        return cls(log_mass.reshape(batch, n_kv * group).contiguous(),
                   value.reshape(batch, n_kv * group, -1).contiguous())


@dataclass
class ClusterInputs:
    """A cluster summary (SPEC 8.1) as the kernels read it: ``count, beta [B,Hkv,C]``, ``ksum [B,Hkv,C,d]``,
    ``vsum [B,Hkv,C,dv]`` (pass them fp32 contiguous to avoid a copy per call) and ``labels [B,Hkv,L]``
    (int32/int64, any strides, ``L`` past every retrieved position). Read entries at or past ``n_anchor``
    are the retrieved T: their members' sums leave the clusters in the kernel."""

    count: torch.Tensor
    ksum: torch.Tensor
    vsum: torch.Tensor
    beta: torch.Tensor
    labels: torch.Tensor
    n_anchor: int


@dataclass
class PageEstimate:
    """Compact pages (SPEC 8.2) as pseudo-tokens: ``logits [B*Hkv, G, >= n_pages]`` fp32 (each page's
    ``tau q_h.kappa_p + beta_p``, -inf for the pages read exactly), written by the score and selection
    kernels of the same step (``select.compact_read_set``), and the pages' values ``nu [B,Hkv,n_pages,dv]``."""

    logits: torch.Tensor
    nu: torch.Tensor
    n_pages: int


def default_split(n_read: int, n_programs: int, block_n: int, sms: int) -> int:
    """Read entries per split (a multiple of block_n): about one program per SM (best on an H100 and
    an H200, docs/KERNEL_NOTES.md); each program's tiles run one after another, ~2 us of latency each."""
    tiles = triton.cdiv(max(n_read, 1), block_n)
    return max(1, (tiles * n_programs) // sms) * block_n


def fused_decode(q, k, v, read_idx, n_read=None, *, scale=None, feature_map=None, estimate=None, clusters=None,
                 pages=None, split=None, page_split=None, block_n=64, num_warps=4, chained=False, phi_dot16=True):
    """Attention of one decode query per sequence over an explicit read set, with the estimates of the rest.

    Args:
      q: ``[B, Hq, d]`` (bf16/fp16/fp32); ``Hq = G * Hkv``, head h reads KV head h // G.
      k: ``[B, Hkv, N, d]``, v: ``[B, Hkv, N, dv]``: the model's cache, any strides, dtype of q.
      read_idx: ``[B, Hkv, R]`` int32/int64 absolute positions read exactly (anchors first, then the
        retrieved T), padded with -1; entries at or past ``n_read`` are ignored.
      n_read: ``[B, Hkv]`` int count of valid entries, or None (all R).
      scale: score scale tau (default ``d ** -0.5``).
      feature_map: None or ``FeatureMapInputs``: the completion computed in the kernel.
      estimate: None or ``Estimate``: an estimate computed outside, merged as one more partial state
        before the one normalization.
      clusters: None or ``ClusterInputs``: the cluster estimate (SPEC 8.1) computed in the kernels.
      pages: None or ``PageEstimate``: the unread compact pages (SPEC 8.2) as pseudo-tokens, in programs
        of their own (``page_split`` pages each; None picks about one program per SM with the reads).
      Clusters and pages each come alone; feature_map and estimate may be merged together.
      split: read entries per program (a multiple of ``block_n``); None picks one for the GPU, ``>= R``
        runs the single-kernel path; smaller values add a merge kernel (flash-decoding). Clusters and
        pages always take the merge kernel.
      block_n, num_warps: tile of gathered tokens and warps per program.
      chained: launch as a programmatic dependent (``launch.chains_launches``) of the kernel that wrote
        ``read_idx`` and ``n_read``; everything else must be older than that kernel.
      phi_dot16: with a feature map and a 16-bit cache, the retrieved tokens' weights ``w = f . f_k``
        are one tensor-core product in the cache dtype (f, f_k lie in [0, 1]) instead of tf32.

    Returns:
      ``(out [B, Hq, dv] in q.dtype, rho [B, Hq] fp32, lse [B, Hq] fp32)``: rho the estimated share of
      the mass, lse the log of the merged normalizer (``m* + log(den)``).

    One or two launches, no host sync, so it can be captured in a CUDA graph; do that for decode: an
    eager call costs ~0.2 ms of host time, ten times its GPU time (docs/KERNEL_NOTES.md).

    Example::

        B, Hq, Hkv, N, d = 1, 8, 2, 256, 64
        q = torch.randn(B, Hq, d); k = torch.randn(B, Hkv, N, d); v = torch.randn(B, Hkv, N, d)
        idx = torch.arange(0, N, 3, dtype=torch.int32).expand(B, Hkv, -1).contiguous()
        out, rho, lse = fused_decode(q, k, v, idx, scale=d ** -0.5)   # TRITON_INTERPRET=1 on CPU
    """
    B, Hq, D = q.shape
    _, Hkv, N, _ = k.shape
    DV = v.shape[-1]
    R = read_idx.shape[-1]
    if Hq % Hkv or k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[-1] != D:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if read_idx.shape[:2] != (B, Hkv) or read_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"read_idx must be int32/int64 [B, Hkv, R], got {read_idx.dtype} {tuple(read_idx.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    dev = q.device
    if n_read is None:
        n_read = torch.full((B, Hkv), R, dtype=torch.int32, device=dev)
    else:
        n_read = n_read.to(device=dev, dtype=torch.int32).contiguous()  # the kernel clamps to R
    f32 = lambda x: x.to(device=dev, dtype=torch.float32).contiguous()  # noqa: E731

    has_phi = feature_map is not None
    M, n_ph, norm_coef, n_anchor = 1, 1, 0.0, 0
    wq = bq = wk = bk = s_sum = z_sum = c_sum = n_read  # never read without a feature map
    if has_phi:
        fm = feature_map
        params = (fm.w_q, fm.b_q, fm.w_k, fm.b_k)
        wq, bq, wk, bk = (t.contiguous() for t in params)
        # the chained prologue reads them before its wait: a copy made just now would race
        chained = chained and all(a is b for a, b in zip((wq, bq, wk, bk), params))
        n_ph, M, dw = wq.shape
        if dw != D or n_ph not in (1, Hkv) or wk.shape != wq.shape or bq.shape != (n_ph, M) or bk.shape != (n_ph, M):
            raise ValueError(f"feature map: w_q {tuple(wq.shape)}, b_q {tuple(bq.shape)}, w_k {tuple(wk.shape)}")
        s_sum, z_sum, c_sum = f32(fm.s), f32(fm.z), f32(fm.c_max)
        if s_sum.shape != (B, Hkv, M, DV) or z_sum.shape != (B, Hkv, M) or c_sum.shape != (B, Hkv):
            raise ValueError(f"summary: s {tuple(s_sum.shape)}, z {tuple(z_sum.shape)}, c {tuple(c_sum.shape)}")
        norm_coef, n_anchor = float(fm.norm_coef), int(fm.n_anchor)
    has_extra = estimate is not None
    if sum(x is not None for x in (feature_map or estimate, clusters, pages)) > 1:
        raise ValueError("clusters and pages are estimates of their own: pass no feature_map or estimate with them")
    x_m = x_v = n_read  # never read without an estimate
    if has_extra:
        x_m, x_v = f32(estimate.log_mass), f32(estimate.value)
        if x_m.shape != (B, Hq) or x_v.shape != (B, Hq, DV):
            raise ValueError(f"estimate: log_mass {tuple(x_m.shape)}, value {tuple(x_v.shape)}; want [B,Hq], [B,Hq,dv]")
    C, labels, cnt, cks, cvs, cbeta = 1, n_read[..., None], n_read, n_read, n_read, n_read  # read only with clusters
    if clusters is not None:
        cl = clusters
        C = int(cl.count.shape[-1])
        cnt, cks, cvs, cbeta = f32(cl.count), f32(cl.ksum), f32(cl.vsum), f32(cl.beta)
        chained = chained and cks is cl.ksum  # read before the chained wait: a fresh copy would race
        labels, n_anchor = cl.labels, int(cl.n_anchor)
        if (cnt.shape != (B, Hkv, C) or cks.shape != (B, Hkv, C, D) or cvs.shape != (B, Hkv, C, DV)
                or cbeta.shape != (B, Hkv, C) or labels.shape[:2] != (B, Hkv) or labels.dim() != 3):
            raise ValueError(f"clusters: count {tuple(cnt.shape)}, ksum {tuple(cks.shape)}, vsum {tuple(cvs.shape)}, "
                             f"beta {tuple(cbeta.shape)}, labels {tuple(labels.shape)} do not match q, k, v")
        if labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cluster labels must be int32/int64, got {labels.dtype}")
    n_pages, lh, nu = 0, n_read[..., None], v  # read only with pages
    if pages is not None:
        lh, nu, n_pages = pages.logits, pages.nu, int(pages.n_pages)
        if (lh.dim() != 3 or lh.shape[:2] != (B * Hkv, G) or lh.shape[2] < n_pages or lh.dtype != torch.float32
                or lh.stride(-1) != 1 or nu.shape != (B, Hkv, n_pages, DV)):
            raise ValueError(f"pages: logits {lh.dtype} {tuple(lh.shape)}, nu {tuple(nu.shape)}; want fp32 "
                             f"[{B * Hkv}, {G}, >= {n_pages}] (unit last stride) and [{B}, {Hkv}, {n_pages}, {DV}]")

    interp = interpreting(q)
    f32_dots = interp or q.dtype == torch.float32
    lo = 16  # GPU tl.dot needs every dim >= 16; the interpreter runs the same padded shapes
    GP, BD, BDV, BM = p2(G, lo), p2(D, lo), p2(DV, lo), p2(M, lo)
    block_n = p2(block_n, lo)
    if split is None:
        split = default_split(R, B * Hkv, block_n, 1 if interp else n_sms(dev))
    split = max(block_n, triton.cdiv(split, block_n) * block_n)
    n_rsplits = triton.cdiv(max(R, 1), split)
    pchunk, n_psplits = block_n, 0
    if pages is not None and n_pages > 0:
        if page_split is None:
            page_split = default_split(n_pages, B * Hkv, block_n, 1 if interp else n_sms(dev))
        pchunk = max(block_n, triton.cdiv(page_split, block_n) * block_n)
        n_psplits = triton.cdiv(n_pages, pchunk)
    n_splits = n_rsplits + n_psplits
    use_merge = n_splits > 1 or clusters is not None or pages is not None
    out = torch.empty(B, Hq, DV, dtype=q.dtype, device=dev)
    rho = torch.empty(B, Hq, dtype=torch.float32, device=dev)
    lse = torch.empty_like(rho)
    pm = pl = pacc = pw = pwv = plam = pfs = pfz = rho  # never read with one split
    pct = psc = pvs = pqk = rho  # read only with clusters
    if use_merge:
        pm = torch.empty(B * Hkv, n_splits, G, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B * Hkv, n_splits, G, DV, dtype=torch.float32, device=dev)
        if has_phi:
            pw, pwv, plam = torch.empty_like(pl), torch.empty_like(pacc), torch.empty_like(rho)
            pfs, pfz = torch.empty(B, Hq, DV, dtype=torch.float32, device=dev), torch.empty_like(rho)
        if clusters is not None:
            pct = torch.empty(B * Hkv, n_splits, C, dtype=torch.float32, device=dev)
            psc = torch.empty(B * Hkv, n_splits, G, C, dtype=torch.float32, device=dev)
            pvs = torch.empty(B * Hkv, n_splits, C, DV, dtype=torch.float32, device=dev)
            pqk = torch.empty(B, Hq, C, dtype=torch.float32, device=dev)
    pdl = dict(launch_pdl=True) if chained else {}
    decode_kernel[(B * Hkv, n_splits)](
        q, k, v, read_idx, n_read, wq, bq, wk, bk, s_sum, z_sum, c_sum, x_m, x_v,
        labels, cks, pct, psc, pvs, pqk, lh, nu,
        out, rho, lse, pm, pl, pacc, pw, pwv, plam, pfs, pfz,
        *q.stride(), *k.stride(), *v.stride(), *read_idx.stride(), *labels.stride(), *lh.stride()[:2], *nu.stride(),
        Hkv, G, D, DV, M, R, n_anchor, n_splits, split, scale, math.sqrt(scale), 0.5 * norm_coef * scale,
        C, n_pages, n_rsplits, pchunk,
        GP=GP, BLOCK_N=block_n, BLOCK_D=BD, BLOCK_DV=BDV, BLOCK_M=BM, HAS_PHI=has_phi,
        PHI_PER_HEAD=has_phi and n_ph == Hkv, HAS_EXTRA=has_extra, SPLIT=use_merge, F32_DOTS=f32_dots,
        GDC=chained, PHI_DOT16=phi_dot16 and not f32_dots, CLUSTER=clusters is not None, PAGES=n_psplits > 0,
        BLOCK_C=p2(C, lo), num_warps=num_warps, **pdl,
    )
    if use_merge:
        merge_dv = min(BDV, 32) if clusters is not None else BDV  # see merge_kernel
        merge_kernel[(B * Hq, triton.cdiv(DV, merge_dv))](
            out, rho, lse, pm, pl, pacc, pw, pwv, plam, pfs, pfz, x_m, x_v,
            cnt, cbeta, cvs, pct, psc, pvs, pqk, G, DV, n_splits, n_rsplits, C,
            BLOCK_S=min(32, p2(n_splits, 2)), BLOCK_DV=merge_dv, HAS_PHI=has_phi, HAS_EXTRA=has_extra, GDC=chained,
            CLUSTER=clusters is not None, PAGES=n_psplits > 0, BLOCK_C=p2(C, lo), num_warps=4, **pdl,
        )
    return out, rho, lse
