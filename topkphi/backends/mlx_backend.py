"""The MLX backend: the whole SPEC in MLX ops on any MLX device, with a fused Metal decode on Apple GPUs.

    import mlx.core as mx, topkphi
    be = topkphi.get_backend("mlx")
    cfg = topkphi.Config(n_sink=4, n_tail=64, top_k=64, selection="page")
    k = mx.random.normal((1, 2, 1024, 64)); v = mx.random.normal((1, 2, 1024, 64))
    q = mx.random.normal((1, 8, 64))
    summary = be.build_summary(k, v, cfg)          # then be.append(summary, k, v, cfg) per new token
    out, stats = be.decode(q, k, v, summary, cfg)  # out [1, 8, 64] in q's dtype

``decode`` is ``select`` (the read set) followed by ``attend`` (the merge); ``use_metal`` is the
one place that decides whether ``attend`` runs the Metal kernel or the pure-MLX ops.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import numpy as np

from topkphi.backends import mlx_ops as ops
from topkphi.backends.base import DecodeStats
from topkphi.config import Config, check_shapes
from topkphi.feature_maps import FeatureMap
from topkphi.reads import read_counts
from topkphi.regions import Regions, n_selected_pages, n_selected_tokens
from topkphi.summary import Summary, check_compatible, fold_range

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def use_metal(params: ops.MapParams | None, q: mx.array, k: mx.array, v: mx.array) -> bool:
    """The single switch between the Metal kernel and the pure-MLX ``attend``.

    Metal only when a Metal device exists and is MLX's default device, the map is exp-linear (or
    absent: Top-K only), and the kernel takes the shapes; taylor2, Linux CPU and CUDA take MLX ops.
    """
    if not (mx.metal.is_available() and mx.default_device() == mx.gpu):
        return False
    if params is not None and not params.exp_linear:
        return False
    from topkphi.backends.mlx_metal import metal_supported

    return metal_supported(q, k, v, params.n_features if params is not None else 1, params is not None)


@dataclass
class Selection:
    """What ``select`` returns: the read set and the retrieved part of it.

    ``read_idx [B,Hkv,R]`` int32 = sink, then T (-1 padded), then tail; ``selected [B,Hkv,W]``
    T ascending, -1 padded; ``n_selected [B,Hkv]``; ``complete [B,Hkv]`` whether the summary
    completes this head (a T that covers the whole mid is exact attention).
    """

    read_idx: mx.array
    selected: mx.array
    n_selected: mx.array
    complete: mx.array


def _as_mx(x: Any, name: str) -> mx.array:
    if not isinstance(x, mx.array):
        x = np.asarray(x)
        x = mx.array(x.astype(np.float32) if x.dtype == np.float64 else x)
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    return x


def _state(x: Any) -> Any:
    """Summary arrays as float32 MLX arrays (a summary built by another backend is converted)."""
    if x is None or (isinstance(x, mx.array) and x.dtype == mx.float32):
        return x
    return mx.array(np.asarray(x, dtype=np.float32)) if not isinstance(x, mx.array) else x.astype(mx.float32)



class MLXBackend:
    """SPEC sections 2-6 in MLX: float32 accumulation, vectorized over batch, KV heads and groups."""

    name = "mlx"

    def __init__(self) -> None:
        self._params: weakref.WeakKeyDictionary[FeatureMap, ops.MapParams] = weakref.WeakKeyDictionary()

    def map_params(self, fmap: FeatureMap | None) -> ops.MapParams | None:
        """The map's parameters as float32 MLX arrays, converted on first use and cached per map."""
        if fmap is None:
            return None
        cached = self._params.get(fmap)
        if cached is None:
            if fmap.exp_linear:
                arrays = [mx.array(np.asarray(a, dtype=np.float32)) for a in (fmap.w_q, fmap.b_q, fmap.w_k, fmap.b_k)]
                cached = ops.MapParams(fmap.kind, fmap.n_features, float(fmap.norm_coef), *arrays)
            else:
                cached = ops.MapParams(fmap.kind, fmap.n_features)
            self._params[fmap] = cached
        return cached

    def build_summary(self, k, v, cfg: Config) -> Summary:
        k, v = _as_mx(k, "k"), _as_mx(v, "v")
        batch, _, n_kv, _, d, dv = check_shapes(None, k, v)
        fmap = cfg.feature_map_for(d)
        empty = Summary(n_tokens=0, mid_start=cfg.n_sink, mid_end=cfg.n_sink, first_page=cfg.n_sink // cfg.page_size)
        if fmap is not None:
            fmap.check_heads(n_kv)
            m = fmap.n_features
            empty.s = mx.zeros((batch, n_kv, m, dv), dtype=mx.float32)
            empty.z = mx.zeros((batch, n_kv, m), dtype=mx.float32)
            empty.c_max = mx.full((batch, n_kv), -float("inf"), dtype=mx.float32)
        if cfg.selection == "page":
            empty.kmin = mx.zeros((batch, n_kv, 0, d), dtype=mx.float32)
            empty.kmax = mx.zeros((batch, n_kv, 0, d), dtype=mx.float32)
        return self.append(empty, k, v, cfg)

    def append(self, summary: Summary, k, v, cfg: Config) -> Summary:
        k, v = _as_mx(k, "k"), _as_mx(v, "v")
        check_shapes(None, k, v)
        n_tokens = k.shape[2]
        lo, hi = fold_range(summary, cfg, n_tokens)
        out = replace(summary, n_tokens=n_tokens, mid_end=hi)
        if hi == lo:
            return out
        d = k.shape[3]
        params = self.map_params(cfg.feature_map_for(d))
        if params is not None:
            s, z, c_max = (_state(a) for a in (summary.s, summary.z, summary.c_max))
            out.s, out.z, out.c_max = ops.fold(s, z, c_max, k[:, :, lo:hi], v[:, :, lo:hi], params, cfg.tau(d))
        if summary.kmin is not None:
            out.kmin, out.kmax = ops.fold_pages(_state(summary.kmin), _state(summary.kmax), k, lo, hi,
                                                summary.mid_start, cfg.page_size)
        return out

    def select(self, q_g: mx.array, k: mx.array, summary: Summary, cfg: Config, regions: Regions,
               completes: bool) -> Selection:
        """The read set of every KV head (SPEC section 3); ``q_g [B,Hkv,G,d]`` float32."""
        batch, n_kv, n_tokens, d = k.shape
        tau = cfg.tau(d)
        n_mid = regions.n_mid
        if n_mid == 0:
            selected = mx.zeros((batch, n_kv, 0), dtype=mx.int32)
            n_sel = mx.zeros((batch, n_kv), dtype=mx.int32)
        elif cfg.selection == "exact":
            n_take = n_selected_tokens(cfg.top_k, n_mid)
            selected, n_sel = ops.select_exact(q_g, k, regions.mid_start, regions.mid_end, n_take, tau)
        else:
            n_take = n_selected_pages(cfg.top_k, cfg.page_size, summary.n_pages)
            selected, n_sel = ops.select_pages(q_g, _state(summary.kmin), _state(summary.kmax), summary.first_page,
                                               regions.mid_start, regions.mid_end, cfg.page_size, n_take, tau)
        anchors = [mx.arange(0, regions.sink_end, dtype=mx.int32), mx.arange(regions.mid_end, n_tokens, dtype=mx.int32)]
        sink, tail = (mx.broadcast_to(a, (batch, n_kv, a.size)) for a in anchors)
        read_idx = mx.concatenate([sink, selected, tail], axis=2)
        complete = (n_sel < n_mid) if completes else mx.zeros((batch, n_kv), dtype=mx.bool_)
        return Selection(read_idx, selected, n_sel, complete)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, sel: Selection, summary: Summary, cfg: Config,
               regions: Regions, params: ops.MapParams | None) -> tuple[mx.array, mx.array]:
        """SPEC section 5 over ``sel``: ``(out [B,Hq,dv] in q's dtype, rho [B,Hq] float32)``."""
        batch, n_q, d = q.shape
        _, n_kv, _, dv = v.shape
        tau = cfg.tau(d)
        phi = None
        if params is not None:
            phi = (params, _state(summary.s), _state(summary.z), _state(summary.c_max), sel.complete)
        if use_metal(params, q, k, v):
            from topkphi.backends.mlx_metal import metal_attend

            return metal_attend(q, k, v, sel.read_idx, tau, regions.mid_start, regions.mid_end, phi)
        q_g = q.astype(mx.float32).reshape(batch, n_kv, n_q // n_kv, d)
        out, rho = ops.attend(q_g, k, v, sel.read_idx, tau, regions.mid_start, regions.mid_end, phi)
        return out.reshape(batch, n_q, dv).astype(q.dtype), rho.reshape(batch, n_q)

    def decode(self, q, k, v, summary: Summary, cfg: Config) -> tuple[mx.array, DecodeStats]:
        q, k, v = _as_mx(q, "q"), _as_mx(k, "k"), _as_mx(v, "v")
        dims = check_shapes(q, k, v)
        batch, n_q, n_kv, n_tokens, d, dv = dims
        check_compatible(summary, cfg, n_tokens)
        fmap = cfg.feature_map_for(d)
        if fmap is not None:
            fmap.check_heads(n_kv)
        regions = Regions.of(n_tokens, cfg.n_sink, cfg.n_tail)
        uses_summary = fmap is not None and regions.n_mid > 0
        params = self.map_params(fmap) if uses_summary else None
        q_g = q.astype(mx.float32).reshape(batch, n_kv, dims.group, d)
        sel = self.select(q_g, k, summary, cfg, regions, uses_summary)
        out, rho = self.attend(q, k, v, sel, summary, cfg, regions, params)

        n_read = sel.n_selected + regions.n_anchor
        # reads per KV head (SPEC section 6): the summary counts only where it completes the head
        with_phi = read_counts(cfg, 0, regions.n_mid, True, fmap, d, dv).total
        without = read_counts(cfg, 0, regions.n_mid, False, fmap, d, dv).total
        reads = n_read.astype(mx.float32) + mx.where(sel.complete, with_phi, without)
        stats = DecodeStats(rho=rho, selected=sel.selected, n_selected=sel.n_selected, tokens_read=n_read,
                            token_equivalents=reads, n_tokens=n_tokens)
        return out, stats

    def dense(self, q, k, v, scale: float | None = None) -> mx.array:
        q, k, v = _as_mx(q, "q"), _as_mx(k, "k"), _as_mx(v, "v")
        batch, n_q, n_kv, _, d, dv = check_shapes(q, k, v)
        tau = scale if scale is not None else d**-0.5
        q_g = q.astype(mx.float32).reshape(batch, n_kv, n_q // n_kv, d)
        scores = tau * (q_g @ k.astype(mx.float32).swapaxes(-1, -2))
        p = mx.exp(scores - scores.max(axis=-1, keepdims=True))
        out = (p @ v.astype(mx.float32)) / p.sum(axis=-1)[..., None]
        return out.reshape(batch, n_q, dv).astype(q.dtype)
