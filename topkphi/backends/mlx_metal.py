"""Launcher of the fused Metal decode (``topkphi/kernels/metal_decode.py``): packing, shapes, grid.

``metal_plan`` builds every argument of the kernel call and runs anywhere, so it is tested on
Linux; ``metal_attend`` calls the kernel and is reached only through ``mlx_backend.use_metal``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from topkphi.kernels.metal_decode import INPUT_NAMES, SIMD, decode_kernel, simdgroups_for


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


def metal_plan(q, k, v, read_idx, tau: float, mid_start: int, mid_end: int, phi=None) -> MetalPlan:
    """Arguments of the kernel for ``q [B,Hq,d]``, ``k [B,Hkv,N,d]``, ``v [B,Hkv,N,dv]`` (one dtype),
    ``read_idx [B,Hkv,R]`` int32 (-1 = unused); ``phi`` as in ``mlx_ops.attend`` (exp-linear maps).

    k and v go in as they are (the kernel reads their strides); everything else is made contiguous.
    """
    batch, n_q, d = q.shape
    n_kv, dv = v.shape[1], v.shape[3]
    group = n_q // n_kv
    n_read = read_idx.shape[2]
    has_phi = phi is not None
    if has_phi:
        params, s_sum, z_sum, c_max, complete = phi
        if not params.exp_linear:
            raise ValueError("the Metal kernel takes exp-linear feature maps only (prf, learned)")
        m = params.n_features
        per_head = params.w_q.shape[0] > 1
        phi_in = [complete.astype(mx.int32), params.w_q, params.b_q, params.w_k, params.b_k, s_sum, z_sum, c_max]
        half_nc = 0.5 * params.norm_coef
    else:
        m, per_head, half_nc = 1, False, 0.0
        dummy = mx.zeros((1,), dtype=mx.float32)  # never read when HAS_PHI is false
        phi_in = [mx.zeros((1,), dtype=mx.int32)] + [dummy] * 7
    nsg = simdgroups_for(group, d, dv, m, has_phi)
    if nsg is None:
        raise ValueError(f"group={group}, d={d}, dv={dv}, m={m} need more threadgroup memory than Metal gives")
    small = [mx.contiguous(a) for a in (q, read_idx.astype(mx.int32), *phi_in)]  # no-ops when already so
    inputs = [small[0], k, v, *small[1:], n_kv, n_read, mid_start, mid_end,
              float(tau), math.sqrt(tau), half_nc]
    assert len(inputs) == len(INPUT_NAMES)
    template = [("InT", q.dtype), ("G", group), ("D", d), ("DV", dv), ("M", m), ("NSG", nsg),
                ("HAS_PHI", has_phi), ("PHI_PER_HEAD", per_head)]
    return MetalPlan(inputs, template, (SIMD * nsg, batch * n_kv, 1), (SIMD * nsg, 1, 1),
                     [(batch, n_q, dv), (batch, n_q)], [q.dtype, mx.float32])


def metal_attend(q, k, v, read_idx, tau: float, mid_start: int, mid_end: int, phi=None):
    """``(out [B,Hq,dv] in q's dtype, rho [B,Hq] float32)`` from the Metal kernel. Metal only."""
    out, rho = decode_kernel()(**metal_plan(q, k, v, read_idx, tau, mid_start, mid_end, phi).kwargs())
    return out, rho
