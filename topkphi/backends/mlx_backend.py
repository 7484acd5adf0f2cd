"""The MLX backend: the primitives of ``topkphi.backends.base.Backend`` in MLX ops on any MLX device,
with a fused Metal decode on Apple GPUs.

    import mlx.core as mx, topkphi
    be = topkphi.get_backend("mlx")
    cfg = topkphi.Config(n_sink=4, n_tail=64, top_k=64, selection="page")
    k = mx.random.normal((1, 2, 1024, 64)); v = mx.random.normal((1, 2, 1024, 64))
    q = mx.random.normal((1, 8, 64))
    summary = be.build_summary(k, v, cfg)          # then be.append(summary, k, v, cfg) per new token
    out, stats = be.decode(q, k, v, summary, cfg)  # out [1, 8, 64] in q's dtype

Fitted configs (``feature_map="cluster"``, ``selection="compact"``) pass
``queries=topkphi.ReferenceQueries(q_rows, end)`` to ``build_summary``. ``use_metal`` is the one
place that decides whether ``attend`` runs the Metal kernel or the pure-MLX ops. A summary built
by another backend is made MLX's with ``to_mlx_summary``.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import mlx.core as mx
import numpy as np

from topkphi.backends import mlx_budget, mlx_metal
from topkphi.backends import mlx_ops as ops
from topkphi.backends import mlx_select as select
from topkphi.backends.base import Backend, EstimatorOps
from topkphi.backends.mlx_estimators import ClusterOps, CompactOps, FeatureMapOps, MapParams, c_reference
from topkphi.config import Config, Dims, check_shapes
from topkphi.step import ReadSet
from topkphi.summary import PageBounds, ReferenceQueries, Summary

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def use_metal(q: mx.array, k: mx.array, v: mx.array, kernel_map: MapParams | None) -> bool:
    """The single switch between the Metal kernel and the pure-MLX ``attend``.

    Metal only when a Metal device exists and is MLX's default device and the kernel takes the
    shapes; ``kernel_map`` is the exp-linear map the kernel completes with, None when it reads
    exactly only (Top-K only, or an estimate made in MLX ops and merged after it). Linux CPU and
    CUDA take MLX ops.
    """
    if not (mx.metal.is_available() and mx.default_device() == mx.gpu):
        return False
    if kernel_map is not None and not kernel_map.exp_linear:
        return False
    has_phi = kernel_map is not None
    return mlx_metal.metal_supported(q, k, v, kernel_map.n_features if has_phi else 1, has_phi)


def _as_mx(x: Any, name: str) -> mx.array:
    if not isinstance(x, mx.array):
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
        x = mx.array(x.astype(np.float32) if x.dtype == np.float64 else x)
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    return x


def _state_array(x: Any) -> Any:
    """One summary array as MLX's: floats as float32, integers (labels) as int32."""
    if x is None or isinstance(x, (int, float)):
        return x
    if isinstance(x, mx.array):
        return x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x.astype(mx.int32)
    x = np.asarray(x)
    return mx.array(x.astype(np.float32) if x.dtype.kind == "f" else x.astype(np.int32))


def to_mlx_summary(summary: Summary) -> Summary:
    """A copy of ``summary`` (e.g. built by the numpy oracle) whose arrays are MLX arrays."""
    def convert(part):
        if part is None:
            return None
        return replace(part, **{f.name: _state_array(getattr(part, f.name)) for f in fields(part)})

    return replace(summary, estimate=convert(summary.estimate), pages=convert(summary.pages))


class MLXBackend(Backend):
    """SPEC 2-9 in MLX: float32 accumulation, vectorized over batch, KV heads and groups."""

    name = "mlx"
    array_ops = mlx_budget.MLXArrayOps()

    def __init__(self) -> None:
        self._ops: dict[str, EstimatorOps] = {"feature_map": FeatureMapOps(), "cluster": ClusterOps(),
                                              "compact": CompactOps()}

    def as_arrays(self, x, name):
        """MLX float arrays; NumPy float64 becomes float32 (MLX computes no float64 on the GPU)."""
        return _as_mx(x, name)

    def check_inputs(self, q, k, v) -> Dims:
        """Shapes; ``as_arrays`` checked the dtypes (mixed ones take MLX ops, see ``use_metal``)."""
        return check_shapes(q, k, v)

    def estimator_ops(self, cfg: Config) -> EstimatorOps | None:
        return self._ops.get(cfg.estimator)

    # ------------------------------------------------------------ pages (SPEC 3, 8.2)

    def empty_pages(self, cfg: Config, dims: Dims, like):
        return select.empty_pages(cfg, dims)

    def fold_pages(self, pages, summary: Summary, k, v, lo, hi, cfg: Config):
        if isinstance(pages, PageBounds):
            return select.fold_bounds(pages, k, lo, hi, summary.mid_start, cfg.page_size)
        return select.fold_compact(pages, summary, k, v, lo, hi, cfg.page_size)

    def add_query_mass(self, pages, k, queries: ReferenceQueries, cfg: Config):
        return select.add_query_mass(pages, k, queries, cfg.tau(k.shape[3]))

    def add_tail_mass(self, pages, q, k, lse, regions, tau):
        return select.add_tail_mass(pages, q, k, lse, regions, tau)

    # ------------------------------------------------------------ selection and attention (SPEC 3, 5)

    def read_set(self, q, k, summary: Summary, plan, cfg: Config, tau: float) -> ReadSet:
        batch, n_q, d = q.shape
        return select.read_set(ops.f32(q).reshape(batch, k.shape[1], n_q // k.shape[1], d), k, summary, plan, cfg, tau)

    def unit_masses(self, q, k, summary: Summary, plan, cfg: Config, tau: float):
        return mlx_budget.unit_masses(q, k, summary, plan, cfg, tau)

    def units_read_set(self, units, summary: Summary, plan, cfg: Config) -> ReadSet:
        return mlx_budget.units_read_set(units, summary, plan, cfg)

    def attend(self, q, k, v, reads: ReadSet, est: EstimatorOps | None, summary: Summary, cfg: Config, tau: float):
        """SPEC 5 over ``reads``: ``(out [B,Hq,dv] in q's dtype, rho [B,Hq], lse [B,Hq])`` float32."""
        batch, n_q, d = q.shape
        n_kv, dv = k.shape[1], v.shape[3]
        q_g = ops.f32(q).reshape(batch, n_kv, n_q // n_kv, d)
        in_kernel = kernel_phi(est, summary, cfg, d, n_kv)
        on_metal = use_metal(q, k, v, in_kernel.params if in_kernel is not None else None)
        # MLX is lazy: rows an estimator never reads (compact) are never gathered
        k_read, v_read = ops.gather_rows(k, reads.idx), ops.gather_rows(v, reads.idx)
        extra = None  # the estimate as a state, merged with the exact one (on Metal: after the kernel)
        if est is not None and not (on_metal and in_kernel is not None):
            extra = estimate_state(q_g, k_read, v_read, reads, est, summary, cfg, tau)
        if on_metal:
            return mlx_metal.metal_attend(q, k, v, reads, tau, in_kernel, extra)
        scores = mx.where((reads.idx >= 0)[:, :, None, :], tau * (q_g @ k_read.swapaxes(-1, -2)), -float("inf"))
        state = ops.exact_state(scores, v_read)
        if extra is not None:
            state = ops.merge(state, extra)
        out, rho, lse = ops.finish(state)
        return out.reshape(batch, n_q, dv).astype(q.dtype), rho.reshape(batch, n_q), lse.reshape(batch, n_q)

    def dense(self, q, k, v, scale: float | None = None) -> mx.array:
        q, k, v = _as_mx(q, "q"), _as_mx(k, "k"), _as_mx(v, "v")
        batch, n_q, n_kv, _, d, dv = check_shapes(q, k, v)
        tau = scale if scale is not None else d**-0.5
        q_g = ops.f32(q).reshape(batch, n_kv, n_q // n_kv, d)
        scores = tau * (q_g @ ops.f32(k).swapaxes(-1, -2))
        p = mx.exp(scores - scores.max(axis=-1, keepdims=True))
        out = (p @ ops.f32(v)) / p.sum(axis=-1)[..., None]
        return out.reshape(batch, n_q, dv).astype(q.dtype)


def estimate_state(q_g, k_read, v_read, reads: ReadSet, est: EstimatorOps, summary: Summary, cfg: Config,
                   tau: float) -> ops.AttnState:
    """The estimator's part of SPEC 5 as an attention state over ``[B,Hkv,G]``."""
    retrieved = (reads.idx >= 0) & (mx.arange(reads.idx.shape[2]) >= reads.n_anchor)
    return ops.estimate_state(*est.estimate(q_g, k_read, v_read, retrieved, reads, summary, cfg, tau))


def kernel_phi(est: EstimatorOps | None, summary: Summary, cfg: Config, d: int,
               n_kv: int) -> mlx_metal.KernelPhi | None:
    """The completion the Metal kernel runs itself (exp-linear feature maps), else None: Top-K only,
    or an estimate made in MLX ops and merged with the kernel's state."""
    if not isinstance(est, FeatureMapOps):
        return None
    params = est.params(cfg, d, n_kv)
    if not params.exp_linear:
        return None
    st = summary.estimate
    return mlx_metal.KernelPhi(params, ops.f32(st.s), ops.f32(st.z), c_reference(st.c_max))
