"""Launcher of the fused Metal decode (``topkphi/kernels/metal_decode.py``): packing, shapes, grid, merge.

``metal_plan`` builds every argument of the kernel call and runs anywhere, so it is tested on
Linux; so is ``finish``, which merges an estimate made in MLX ops with the kernel's state.
``metal_attend`` calls the kernel and is reached only through ``mlx_backend.use_metal``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from topkphi.backends import mlx_ops as ops
from topkphi.backends.mlx_estimators import MapParams
from topkphi.kernels.metal_decode import INPUT_NAMES, SIMD, decode_kernel, simdgroups_for
from topkphi.step import ReadSet


@dataclass
class KernelPhi:
    """What the kernel completes with in-kernel: an exp-linear map and the summary's ``(S, z, C)``."""

    params: MapParams
    s_sum: mx.array  # [B, Hkv, m, dv] float32
    z_sum: mx.array  # [B, Hkv, m] float32
    c_big: mx.array  # [B, Hkv] float32, 0 where nothing is folded


@dataclass
class MetalPlan:
    """The keyword arguments of one kernel call, in ``INPUT_NAMES`` order."""

    inputs: list[Any]
    template: list[tuple[str, Any]]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]

    def kwargs(self) -> dict[str, Any]:
        return dict(inputs=self.inputs, template=self.template, grid=self.grid, threadgroup=self.threadgroup,
                    output_shapes=self.output_shapes, output_dtypes=self.output_dtypes)


def metal_supported(q: mx.array, k: mx.array, v: mx.array, n_features: int, has_phi: bool) -> bool:
    """Shapes and dtypes the kernel takes: one dtype for q, k, v and threadgroup memory that fits."""
    if not (q.dtype == k.dtype == v.dtype):
        return False
    group = q.shape[1] // k.shape[1]
    return simdgroups_for(group, k.shape[3], v.shape[3], n_features, has_phi) is not None


def metal_plan(q, k, v, reads: ReadSet, tau: float, phi: KernelPhi | None = None,
               out_dtype: mx.Dtype | None = None) -> MetalPlan:
    """Arguments of the kernel for ``q [B,Hq,d]``, ``k [B,Hkv,N,d]``, ``v [B,Hkv,N,dv]`` (one dtype)
    and the read set; ``out_dtype`` defaults to q's (float32 when an outside estimate follows).

    k and v go in as they are (the kernel reads their strides); everything else is made contiguous.
    """
    batch, n_q, d = q.shape
    n_kv, dv = v.shape[1], v.shape[3]
    group = n_q // n_kv
    idx = reads.idx.astype(mx.int32)
    if phi is not None:
        p = phi.params
        if not p.exp_linear:
            raise ValueError("the Metal kernel completes with exp-linear feature maps only (prf, learned)")
        m, per_head, half_nc = p.n_features, p.w_q.shape[0] > 1, 0.5 * p.norm_coef
        phi_in = [p.w_q, p.b_q, p.w_k, p.b_k, phi.s_sum, phi.z_sum, phi.c_big]
    else:
        m, per_head, half_nc = 1, False, 0.0
        phi_in = [mx.zeros((1,), dtype=mx.float32)] * 7  # never read when HAS_PHI is false
    nsg = simdgroups_for(group, d, dv, m, phi is not None)
    if nsg is None:
        raise ValueError(f"group={group}, d={d}, dv={dv}, m={m} need more threadgroup memory than Metal gives")
    small = [mx.contiguous(q), mx.contiguous(idx), *(mx.contiguous(ops.f32(a)) for a in phi_in)]  # no-ops if so
    inputs = [small[0], k, v, *small[1:], n_kv, idx.shape[2], int(reads.n_anchor),
              float(tau), math.sqrt(tau), half_nc]
    if len(inputs) != len(INPUT_NAMES):
        raise AssertionError(f"{len(inputs)} kernel inputs for {len(INPUT_NAMES)} names")
    out_dtype = q.dtype if out_dtype is None else out_dtype
    template = [("InT", q.dtype), ("OutT", out_dtype), ("G", group), ("D", d), ("DV", dv), ("M", m),
                ("NSG", nsg), ("HAS_PHI", phi is not None), ("PHI_PER_HEAD", per_head)]
    return MetalPlan(inputs, template, (SIMD * nsg, batch * n_kv, 1), (SIMD * nsg, 1, 1),
                     [(batch, n_q, dv), (batch, n_q), (batch, n_q)], [out_dtype, mx.float32, mx.float32])


def finish(out: mx.array, rho: mx.array, lse: mx.array, extra: ops.AttnState | None, dtype: mx.Dtype):
    """``(out [B,Hq,dv] in dtype, rho [B,Hq], lse [B,Hq])`` of the kernel's outputs merged with
    ``extra`` (an estimate over ``[B,Hkv,G]`` made in MLX ops, or None)."""
    if extra is None:
        return out.astype(dtype), rho, lse
    batch, n_q, dv = out.shape
    n_kv, group = extra.m.shape[1:]
    state = ops.normalized_state(out.reshape(batch, n_kv, group, dv), lse.reshape(batch, n_kv, group),
                                 rho.reshape(batch, n_kv, group))
    out, rho, lse = ops.finish(ops.merge(state, extra))
    return out.reshape(batch, n_q, dv).astype(dtype), rho.reshape(batch, n_q), lse.reshape(batch, n_q)


def metal_attend(q, k, v, reads: ReadSet, tau: float, phi: KernelPhi | None = None,
                 extra: ops.AttnState | None = None):
    """``(out [B,Hq,dv] in q's dtype, rho [B,Hq], lse [B,Hq])`` from the Metal kernel. Metal only."""
    plan = metal_plan(q, k, v, reads, tau, phi, mx.float32 if extra is not None else None)
    out, rho, lse = decode_kernel()(**plan.kwargs())
    return finish(out, rho, lse, extra, q.dtype)
