"""The unnormalized merge of the fused decode and its one normalization (SPEC 5), in Triton.

A partial state is ``(m, l, acc)``: running max ``m``, mass ``exp(m) * l`` and weighted values
``exp(m) * acc``. Split-K partials merge with ``state_merge``; ``finalize`` then adds the estimates
of the unread mid and normalizes once:

- the feature map's ``(lam, n_phi, d_phi)``, computed inside the decode kernel (SPEC 4-5);
- an estimate computed outside the kernel (clusters, compact pages: SPEC 8), handed in per query
  head as log-mass ``x_m = lam + log d_phi`` and value ``x_v = n_phi / d_phi``: the state
  ``(x_m, 1, x_v)``, one more split of the merge.

It returns ``out``, ``rho`` (the estimated share of the mass) and ``lse = m* + log(den)``.
Launcher: ``topkphi/triton/decode.py``.
"""

import triton
import triton.language as tl


@triton.jit
def exp_diff(a, b):
    """exp(a - b), 0 where a is -inf (b may be -inf too)."""
    return tl.where(a == float("-inf"), 0.0, tl.exp(a - tl.where(b == float("-inf"), 0.0, b)))


@triton.jit
def state_merge(m_a, l_a, acc_a, m_b, l_b, acc_b):
    """Merge two unnormalized softmax states (m [R], l [R], acc [R, dv]) into one."""
    m = tl.maximum(m_a, m_b)
    alpha = exp_diff(m_a, m)
    beta = exp_diff(m_b, m)
    return m, l_a * alpha + l_b * beta, acc_a * alpha[:, None] + acc_b * beta[:, None]


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
def merge_kernel(
    out_ptr, rho_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr, pw_ptr, pwv_ptr, plam_ptr, pfs_ptr, pfz_ptr, xm_ptr, xv_ptr,
    G, DV, n_splits,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_PHI: tl.constexpr, HAS_EXTRA: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Grid (B*Hq,): merge one query head's n_splits partial states, add the estimates, normalize.

    Row vectors are kept 2-D ([1, ...]) so ``finalize`` serves both kernels unchanged.
    GDC: launched as a programmatic dependent of the decode kernel.
    """
    if GDC:
        tl.extra.cuda.gdc_wait()
    bq_head = tl.program_id(0)  # = (b * Hkv + g) * G + r
    bh = bq_head // G
    r = bq_head % G
    offs_v = tl.arange(0, BLOCK_DV)
    vmask = offs_v < DV
    offs_s = tl.arange(0, BLOCK_S)
    one = tl.zeros([1], tl.int32)

    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, BLOCK_DV], tl.float32)
    d_phi = tl.zeros([1], tl.float32)
    n_phi = tl.zeros([1, BLOCK_DV], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        sm = (s0 + offs_s) < n_splits
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
    out, rho, lse = finalize(m_i, l_i, acc, lam, n_phi, d_phi, x_m, x_v, HAS_PHI, HAS_EXTRA)
    tl.store(out_ptr + bq_head * DV + offs_v[None, :], out.to(out_ptr.dtype.element_ty), mask=vmask[None, :])
    tl.store(rho_ptr + bq_head + one, rho)
    tl.store(lse_ptr + bq_head + one, lse)
