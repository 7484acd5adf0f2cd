"""The unnormalized merge of the fused decode and its one normalization (SPEC 5), in Triton.

A partial state is ``(m, l, acc)``: running max ``m``, mass ``exp(m) * l`` and weighted values
``exp(m) * acc``. Split-K partials merge with ``state_merge``; ``finalize`` then adds the estimates
of the unread mid and normalizes once:

- the feature map's ``(lam, n_phi, d_phi)``, computed inside the decode kernel (SPEC 4-5);
- one more state ``(x_m, 1, x_v)`` per query head (log-mass ``x_m = lam + log d_phi``, value
  ``x_v = n_phi / d_phi``): an estimate computed outside the kernel, the clusters' pseudo-tokens
  (``estimates.cluster_state``) or the merged page splits of the compact pages (SPEC 8).

It returns ``out``, ``rho`` (the estimated share of the mass) and ``lse = m* + log(den)``.
Launcher: ``topkphi/triton/decode.py``.
"""

import triton
import triton.language as tl

from topkphi.triton.kernels.estimates import cluster_state
from topkphi.triton.kernels.states import exp_diff, state_merge


@triton.jit
def finalize(m, lsum, acc, lam, n_phi, d_phi, x_m, x_v, HAS_PHI: tl.constexpr, HAS_EXTRA: tl.constexpr):
    """Merge the estimates into the exact state ``(m, lsum, acc)`` and normalize once.

    Returns ``(out [R, dv], rho [R], lse [R])``. A feature-map estimate with ``d_phi <= 0`` or
    ``lam = -inf`` contributes nothing (SPEC 5: never negative mass), nor does ``x_m = -inf``.
    """
    neg = tl.full(m.shape, float("-inf"), tl.float32)
    phi_m = neg
    if HAS_PHI:
        use = (d_phi > 0.0) & (lam > float("-inf"))
        phi_m = tl.where(use, lam + tl.log(tl.where(use, d_phi, 1.0)), float("-inf"))
    ext_m = neg
    if HAS_EXTRA:
        ext_m = x_m
    m_star = tl.maximum(tl.maximum(m, phi_m), ext_m)
    a = exp_diff(m, m_star)
    den = lsum * a
    num = acc * a[:, None]
    est = tl.zeros(m.shape, tl.float32)
    if HAS_PHI:
        use = phi_m > float("-inf")
        g = exp_diff(phi_m, m_star)  # = exp(lam - m*) * d_phi
        coef = tl.where(use, g / tl.where(use, d_phi, 1.0), 0.0)  # exp(lam - m*)
        den += g
        num += coef[:, None] * tl.where(use[:, None], n_phi, 0.0)
        est += g
    if HAS_EXTRA:
        gx = exp_diff(ext_m, m_star)
        den += gx
        num += tl.where((gx > 0.0)[:, None], gx[:, None] * x_v, 0.0)
        est += gx
    ok = den > 0.0
    safe = tl.where(ok, den, 1.0)
    lse = tl.where(ok, m_star + tl.log(safe), float("-inf"))
    return num / safe[:, None], est / safe, lse


@triton.jit
def merge_splits(pm_ptr, pl_ptr, pacc_ptr, pw_ptr, pwv_ptr, bh, r, G, DV, n_splits, lo, hi, v0,
                 BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_PHI: tl.constexpr):
    """One query head's partial states of splits ``[lo, hi)`` merged: ``(m, l, acc, d_phi, n_phi)`` as
    ``[1]`` / ``[1, BLOCK_DV]`` rows (value columns ``v0 ..``), with the feature map's additive partials
    summed when ``HAS_PHI``."""
    offs_v = v0 + tl.arange(0, BLOCK_DV)
    vmask = offs_v < DV
    offs_s = tl.arange(0, BLOCK_S)
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, BLOCK_DV], tl.float32)
    d_phi = tl.zeros([1], tl.float32)
    n_phi = tl.zeros([1, BLOCK_DV], tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        sm = (s0 + offs_s) < hi
        p_off = (bh * n_splits + s0 + offs_s) * G + r  # [BLOCK_S]
        pm = tl.load(pm_ptr + p_off, mask=sm, other=float("-inf"))
        pl = tl.load(pl_ptr + p_off, mask=sm, other=0.0)
        a_off = p_off[:, None] * DV + offs_v[None, :]
        amask = sm[:, None] & vmask[None, :]
        pacc = tl.load(pacc_ptr + a_off, mask=amask, other=0.0)
        # merge this chunk's states into one, then into the running state
        cm = tl.max(pm, 0, keep_dims=True)
        wgt = exp_diff(pm, cm)
        m_i, l_i, acc = state_merge(
            m_i, l_i, acc, cm, tl.sum(pl * wgt, 0, keep_dims=True), tl.sum(pacc * wgt[:, None], 0, keep_dims=True)
        )
        if HAS_PHI:  # the feature-map partials are additive
            d_phi += tl.sum(tl.load(pw_ptr + p_off, mask=sm, other=0.0), 0, keep_dims=True)
            n_phi += tl.sum(tl.load(pwv_ptr + a_off, mask=amask, other=0.0), 0, keep_dims=True)
    return m_i, l_i, acc, d_phi, n_phi


@triton.jit
def merge_kernel(
    out_ptr, rho_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr, pw_ptr, pwv_ptr, plam_ptr, pfs_ptr, pfz_ptr, xm_ptr, xv_ptr,
    cnt_ptr, beta_ptr, cvs_ptr, pct_ptr, psc_ptr, pvs_ptr, pqk_ptr,
    G, DV, n_splits, n_rsplits, C,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_PHI: tl.constexpr, HAS_EXTRA: tl.constexpr,
    GDC: tl.constexpr = False, CLUSTER: tl.constexpr = False, PAGES: tl.constexpr = False,
    BLOCK_C: tl.constexpr = 16, UNROLL: tl.constexpr = 8,
):
    """Grid (B*Hq, value chunks): merge one query head's partial states, add the estimates, normalize.
    A program serves ``BLOCK_DV`` value columns (all of them but with clusters, whose per-split value
    sums it reads: chunks spread that read over more programs); the masses are the same in each.

    Splits ``[0, n_rsplits)`` read tokens; with PAGES the rest hold the compact pages' pseudo-tokens,
    merged apart into the estimate. CLUSTER: the clusters' fitted count, beta and value sums
    (``cnt, beta [B*Hkv, C]``, ``cvs [B*Hkv, C, dv]`` fp32) less the splits' retrieved sums become the
    estimate (``estimates.cluster_state``). Row vectors are kept 2-D ([1, ...]) so ``finalize`` serves
    both kernels unchanged. GDC: launched as a programmatic dependent of the decode kernel.
    """
    if GDC:
        tl.extra.cuda.gdc_wait()
    bq_head = tl.program_id(0)  # = (b * Hkv + g) * G + r
    bh = bq_head // G
    r = bq_head % G
    v0 = tl.program_id(1) * BLOCK_DV
    offs_v = v0 + tl.arange(0, BLOCK_DV)
    vmask = offs_v < DV
    one = tl.zeros([1], tl.int32)

    m_i, l_i, acc, d_phi, n_phi = merge_splits(pm_ptr, pl_ptr, pacc_ptr, pw_ptr, pwv_ptr, bh, r, G, DV, n_splits,
                                               0, n_rsplits, v0, BLOCK_S, BLOCK_DV, HAS_PHI)
    lam = m_i
    if HAS_PHI:  # plus the summary's readout f^T z, f^T S (stored by split 0)
        d_phi += tl.load(pfz_ptr + bq_head + one)
        n_phi += tl.load(pfs_ptr + bq_head * DV + offs_v[None, :], mask=vmask[None, :], other=0.0)
        lam = tl.load(plam_ptr + bq_head + one)
    x_m = m_i
    x_v = acc
    if HAS_EXTRA:
        x_m = tl.load(xm_ptr + bq_head + one)
        x_v = tl.load(xv_ptr + bq_head * DV + offs_v[None, :], mask=vmask[None, :], other=0.0)
    if PAGES:
        e_m, e_l, e_acc, _, _ = merge_splits(pm_ptr, pl_ptr, pacc_ptr, pw_ptr, pwv_ptr, bh, r, G, DV, n_splits,
                                             n_rsplits, n_splits, v0, BLOCK_S, BLOCK_DV, False)
        some = e_l > 0.0
        x_m = tl.where(some, e_m + tl.log(tl.where(some, e_l, 1.0)), float("-inf"))
        x_v = e_acc / tl.where(some, e_l, 1.0)[:, None]
    if CLUSTER:
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        cv_mask = cmask[:, None] & vmask[None, :]
        taken = tl.zeros([BLOCK_C], tl.float32)
        tsc = tl.zeros([BLOCK_C], tl.float32)
        tv = tl.zeros([BLOCK_C, BLOCK_DV], tl.float32)
        # the retrieved members' sums are additive over splits; UNROLL splits' loads in flight at once
        for s0 in range(0, n_splits, UNROLL):
            for i in tl.static_range(UNROLL):
                c_ok = cmask & (s0 + i + offs_c * 0 < n_splits)
                c_row = bh * n_splits + s0 + i
                taken += tl.load(pct_ptr + c_row * C + offs_c, mask=c_ok, other=0.0)
                tsc += tl.load(psc_ptr + (c_row * G + r) * C + offs_c, mask=c_ok, other=0.0)
                tv += tl.load(pvs_ptr + (c_row * C + offs_c)[:, None] * DV + offs_v[None, :],
                              mask=c_ok[:, None] & vmask[None, :], other=0.0)
        x_m, x_v = cluster_state(tl.load(cnt_ptr + bh * C + offs_c, mask=cmask, other=0.0),
                                 tl.load(beta_ptr + bh * C + offs_c, mask=cmask, other=0.0),
                                 tl.load(cvs_ptr + (bh * C + offs_c)[:, None] * DV + offs_v[None, :], mask=cv_mask,
                                         other=0.0),
                                 tl.load(pqk_ptr + bq_head * C + offs_c, mask=cmask, other=0.0), taken, tsc, tv)
    out, rho, lse = finalize(m_i, l_i, acc, lam, n_phi, d_phi, x_m, x_v, HAS_PHI, HAS_EXTRA or PAGES or CLUSTER)
    tl.store(out_ptr + bq_head * DV + offs_v[None, :], out.to(out_ptr.dtype.element_ty), mask=vmask[None, :])
    tl.store(rho_ptr + bq_head + one, rho)
    tl.store(lse_ptr + bq_head + one, lse)
