"""Launcher of the fused Triton decode kernel: input checks, allocation, grid, split-K.

The caller chooses the read set; this runs SPEC section 5 on it in one pass over the
gathered keys and values (kernels in ``topkphi/kernels/triton_decode.py``).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton

from topkphi.kernels.triton_decode import decode_kernel, merge_kernel


@dataclass
class PhiInputs:
    """The summary and feature-map parameters of one layer, as the kernel reads them.

    ``w_q, w_k [H', m, d]``, ``b_q, b_k [H', m]`` with ``H'`` in ``{1, Hkv}``; ``norm_coef``
    as in ``FeatureMap`` (1 for prf, 0 for learned); ``s [B,Hkv,m,dv]``, ``z [B,Hkv,m]``,
    ``c_max [B,Hkv]`` (the summary's C; -inf marks an empty summary); ``n_anchor [B,Hkv]``
    int: the first ``n_anchor`` entries of ``read_idx`` are sink+tail anchors, the rest are
    the retrieved mid tokens T. Pass s, z, c_max fp32 contiguous to avoid a copy per call;
    the parameters may be any float dtype (contiguous): for a 16-bit cache, w_k in that dtype
    halves its reads and l_k runs on the tensor cores in that dtype either way.
    """

    w_q: torch.Tensor
    b_q: torch.Tensor
    w_k: torch.Tensor
    b_k: torch.Tensor
    norm_coef: float
    s: torch.Tensor
    z: torch.Tensor
    c_max: torch.Tensor
    n_anchor: torch.Tensor


LAST_KERNELS: list = []  # compiled kernels of the last call (registers, spills) for benchmarks


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def _p2(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


@functools.cache
def _n_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreting(t: torch.Tensor) -> bool:
    """Whether Triton kernels on ``t`` run in the interpreter (CPU tensors or ``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or t.device.type == "cpu"


def chain_launches(t: torch.Tensor) -> bool:
    """Whether the step's kernels launch as programmatic dependents of one another (PDL, sm90+): each
    starts while its predecessor drains and waits for it in-kernel (``TOPKPHI_PDL=0`` turns it off)."""
    if interpreting(t) or os.environ.get("TOPKPHI_PDL", "1") == "0" or not _triton_has_pdl():
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


@functools.cache
def _triton_has_pdl() -> bool:
    # gdc_wait and launch_pdl came with Triton 3.3; the [cuda] extra admits 3.2
    try:
        import triton.language.extra.cuda as cuda_extra
    except ImportError:
        return False
    return hasattr(cuda_extra, "gdc_wait")


def default_split(n_tokens: int, n_heads: int, block_n: int, n_sms: int) -> int:
    """Tokens per split (a multiple of block_n): about one program per SM (best on an H100, see
    docs/KERNEL_NOTES.md); each program's tiles run one after another, ~2 us of latency each."""
    tiles = triton.cdiv(max(n_tokens, 1), block_n)
    per_split = max(1, (tiles * n_heads) // n_sms)
    return per_split * block_n


def fused_decode(q, k, v, read_idx, n_read=None, *, scale=None, phi=None, split=None, block_n=64, num_warps=4,
                 stream_wk=False, chained=False, phi_dot16=True):
    """Attention of one decode query per sequence over an explicit read set, with phi completion.

    Args:
      q: ``[B, Hq, d]`` (bf16/fp16/fp32); ``Hq = G * Hkv``, head h reads KV head h // G.
      k: ``[B, Hkv, N, d]``, v: ``[B, Hkv, N, dv]``: the model's cache, any strides, dtype of q.
      read_idx: ``[B, Hkv, R]`` int32/int64 absolute positions read exactly (anchors first,
        then the retrieved T), padded with -1; entries at or past ``n_read`` are ignored.
      n_read: ``[B, Hkv]`` int count of valid entries, or None (all R).
      scale: score scale tau (default ``d ** -0.5``).
      phi: None (Top-K only) or ``PhiInputs``; an entry of ``c_max`` at -inf disables it there.
      split: read entries per program (a multiple of ``block_n``); None picks one for the GPU,
        ``>= R`` runs the single-kernel path; smaller values add a merge kernel (flash-decoding).
      block_n, num_warps: tile of gathered tokens and warps per program.
      stream_wk: with phi, reload ``w_k`` per tile instead of holding it in registers.
      phi_dot16: with phi and a 16-bit cache, the retrieved tokens' weights ``w = f . f_k`` are one
        tensor-core product in the cache dtype (f, f_k lie in [0, 1]) instead of tf32.
      chained: launch as a programmatic dependent (``chain_launches``) of the kernel that wrote
        ``read_idx``, ``n_read`` and ``phi.n_anchor``; everything else must be older than that kernel.

    Returns:
      ``(out [B, Hq, dv] in q.dtype, rho [B, Hq] fp32)``; rho is the estimated unretrieved mass.

    One or two launches, no host sync, so it can be captured in a CUDA graph; do that for
    decode: an eager call costs ~0.2 ms of host time, ten times its GPU time (KERNEL_NOTES.md).

    Example::

        B, Hq, Hkv, N, d = 1, 8, 2, 256, 64
        q = torch.randn(B, Hq, d); k = torch.randn(B, Hkv, N, d); v = torch.randn(B, Hkv, N, d)
        idx = torch.arange(0, N, 3, dtype=torch.int32).expand(B, Hkv, -1).contiguous()
        out, rho = fused_decode(q, k, v, idx, scale=d ** -0.5)   # TRITON_INTERPRET=1 on CPU
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

    has_phi = phi is not None
    if has_phi:
        params = (phi.w_q, phi.b_q, phi.w_k, phi.b_k)
        wq, bq, wk, bk = (t.contiguous() for t in params)  # any float dtype
        # the chained prologue reads them before its wait: a copy made just now would race
        chained = chained and all(a is b for a, b in zip((wq, bq, wk, bk), params))
        n_ph, M, dw = wq.shape
        if dw != D or n_ph not in (1, Hkv) or wk.shape != wq.shape or bq.shape != (n_ph, M) or bk.shape != (n_ph, M):
            raise ValueError(f"phi parameters: w_q {tuple(wq.shape)}, b_q {tuple(bq.shape)}, w_k {tuple(wk.shape)}")
        s_sum, z_sum, c_sum = _f32(phi.s), _f32(phi.z), _f32(phi.c_max)
        if s_sum.shape != (B, Hkv, M, DV) or z_sum.shape != (B, Hkv, M) or c_sum.shape != (B, Hkv):
            raise ValueError(f"phi summary: s {tuple(s_sum.shape)}, z {tuple(z_sum.shape)}, c {tuple(c_sum.shape)}")
        n_anchor = phi.n_anchor.to(device=dev, dtype=torch.int32).contiguous()
        norm_coef = float(phi.norm_coef)
    else:
        M, n_ph, norm_coef = 1, 1, 0.0
        wq = bq = wk = bk = s_sum = z_sum = c_sum = n_anchor = n_read  # never read

    interp = interpreting(q)
    f32_dots = interp or q.dtype == torch.float32
    lo = 16  # GPU tl.dot needs every dim >= 16; the interpreter runs the same padded shapes
    GP, BD, BDV, BM = _p2(G, lo), _p2(D, lo), _p2(DV, lo), _p2(M, lo)
    block_n = _p2(block_n, lo)
    if split is None:
        n_sms = 1 if interp else _n_sms(dev)
        split = default_split(R, B * Hkv, block_n, n_sms)
    split = max(block_n, triton.cdiv(split, block_n) * block_n)
    n_splits = triton.cdiv(max(R, 1), split)

    out = torch.empty(B, Hq, DV, dtype=q.dtype, device=dev)
    rho = torch.empty(B, Hq, dtype=torch.float32, device=dev)
    if n_splits > 1:
        pm = torch.empty(B * Hkv, n_splits, G, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B * Hkv, n_splits, G, DV, dtype=torch.float32, device=dev)
        if has_phi:
            pw, pwv, plam = torch.empty_like(pl), torch.empty_like(pacc), torch.empty_like(rho)
            pfs, pfz = torch.empty_like(out, dtype=torch.float32), torch.empty_like(rho)
        else:
            pw, pwv, plam, pfs, pfz = pl, pacc, rho, pacc, rho  # never read
    else:
        pm = pl = pacc = pw = pwv = plam = pfs = pfz = rho  # never read
    sqrt_scale, half_nc = math.sqrt(scale), 0.5 * norm_coef * scale
    pdl = dict(launch_pdl=True) if chained else {}
    meta = dict(BLOCK_D=BD, BLOCK_DV=BDV, BLOCK_M=BM, HAS_PHI=has_phi, PHI_PER_HEAD=has_phi and n_ph == Hkv)
    launched = decode_kernel[(B * Hkv, n_splits)](
        q,
        k,
        v,
        read_idx,
        n_read,
        wq,
        bq,
        wk,
        bk,
        s_sum,
        z_sum,
        c_sum,
        n_anchor,
        out,
        rho,
        pm,
        pl,
        pacc,
        pw,
        pwv,
        plam,
        pfs,
        pfz,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *read_idx.stride(),
        Hkv,
        G,
        D,
        DV,
        M,
        R,
        n_splits,
        split,
        scale,
        sqrt_scale,
        half_nc,
        GP=GP,
        BLOCK_N=block_n,
        SPLIT=n_splits > 1,
        F32_DOTS=f32_dots,
        STREAM_WK=stream_wk,
        GDC=chained,
        PHI_DOT16=phi_dot16 and not f32_dots,
        num_warps=num_warps,
        **pdl,
        **meta,
    )
    LAST_KERNELS[:] = [launched]
    if n_splits > 1:
        LAST_KERNELS.append(
            merge_kernel[(B * Hq,)](
                out,
                rho,
                pm,
                pl,
                pacc,
                pw,
                pwv,
                plam,
                pfs,
                pfz,
                G,
                DV,
                n_splits,
                BLOCK_S=min(32, _p2(n_splits, 2)),
                BLOCK_DV=BDV,
                HAS_PHI=has_phi,
                GDC=chained,
                num_warps=4,
                **pdl,
            )
        )
    return out, rho
