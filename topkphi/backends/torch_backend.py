"""The PyTorch backend: the SPEC in eager tensor ops, on CPU or CUDA, in the model's dtype.

It is the readable twin of the fused kernels (same read set, same unnormalized merge, written
as named steps) and the fallback wherever Triton is missing. A decode step is two overridable
steps, so a kernel subclass replaces only the hot path:

- ``select(q, k, summary, cfg) -> ReadSet``: which tokens are read exactly
  (``idx [B,Hkv,R]``: sink+tail anchors, then ``T`` ascending, then -1 padding);
- ``attend(q, k, v, reads, phi, tau) -> (out [B,Hq,dv], rho [B,Hq])``: exact attention over the
  read set merged with the summary's estimate of the rest (``phi=None``: Top-K only).

Inputs may be float16, bfloat16 or float32 (float64 is computed in float32); every sum is
float32 and the summary ``(S, z, C)`` is float32. Example::

    be = TorchBackend()
    cfg = topkphi.Config(n_sink=4, n_tail=64, top_k=64, selection="page")
    summary = be.build_summary(k, v, cfg)               # k [B,Hkv,N,d], v [B,Hkv,N,dv]
    out, stats = be.decode(q, k, v, summary, cfg)       # q [B,Hq,d] -> out [B,Hq,dv]
    summary = be.append(summary, k_longer, v_longer, cfg)   # after the cache grows
"""

from __future__ import annotations

from dataclasses import replace

import torch

from topkphi.backends import torch_ops as ops
from topkphi.backends.base import DecodeStats
from topkphi.backends.torch_ops import PhiTensors, ReadSet
from topkphi.config import Config, check_shapes
from topkphi.feature_maps import FeatureMap
from topkphi.reads import read_counts
from topkphi.regions import Regions, n_selected_pages, n_selected_tokens, page_span
from topkphi.summary import Summary, check_compatible, fold_range

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FOLD_ELEMENTS = 1 << 24  # features materialized per fold chunk (taylor2 has m = 1 + d + d^2)


class TorchBackend:
    """Eager PyTorch implementation of the Backend protocol (CPU and CUDA tensors)."""

    name = "torch"

    def __init__(self) -> None:
        self._params: dict[tuple[int, str], tuple[FeatureMap, tuple]] = {}

    # ------------------------------------------------------------ summary (SPEC 4)

    def build_summary(self, k: torch.Tensor, v: torch.Tensor, cfg: Config) -> Summary:
        """Fold the mid region of ``k [B,Hkv,N,d]``, ``v [B,Hkv,N,dv]`` into a fresh summary."""
        batch, _, n_kv, _, d, dv = _check_inputs(None, k, v)
        fmap = cfg.feature_map_for(d)
        empty = Summary(n_tokens=0, mid_start=cfg.n_sink, mid_end=cfg.n_sink, first_page=cfg.n_sink // cfg.page_size)
        dev = k.device
        if fmap is not None:
            fmap.check_heads(n_kv)
            m = fmap.n_features
            empty.s = torch.zeros(batch, n_kv, m, dv, device=dev)
            empty.z = torch.zeros(batch, n_kv, m, device=dev)
            empty.c_max = torch.full((batch, n_kv), ops.NEG_INF, device=dev)
        if cfg.selection == "page":
            n_pages = page_span(cfg.n_sink, max(cfg.n_sink, k.shape[2] - cfg.n_tail), cfg.page_size)[1]
            cap = n_pages + max(16, n_pages // 4)  # spare room: appends write pages in place
            empty.kmin, empty.kmax = (k.new_empty(batch, n_kv, cap, d)[:, :, :0] for _ in range(2))
        return self.append(empty, k, v, cfg)

    def append(self, summary: Summary, k: torch.Tensor, v: torch.Tensor, cfg: Config) -> Summary:
        """Fold the tokens that left the tail since ``summary``; ``k``, ``v`` are the whole cache.

        Costs O(new tokens) plus the touched pages. The page metadata lives in buffers with spare
        room that the returned summary shares with ``summary``: treat the old one as consumed.
        """
        _check_inputs(None, k, v)
        n_tokens = k.shape[2]
        lo, hi = fold_range(summary, cfg, n_tokens)
        out = replace(summary, n_tokens=n_tokens, mid_end=hi)
        if hi == lo:
            return out
        d = k.shape[3]
        fmap = cfg.feature_map_for(d)
        if fmap is not None:
            kind, norm_coef, _, _, w_k, b_k = self._map_tensors(fmap, k.device)
            s, z, c_max = summary.s, summary.z, summary.c_max
            step = max(1, _FOLD_ELEMENTS // (k.shape[0] * k.shape[1] * fmap.n_features))
            for start in range(lo, hi, step):  # chunks bound the materialized features
                stop = min(hi, start + step)
                f, c = ops.features(k[:, :, start:stop].to(torch.float32), kind, w_k, b_k, norm_coef, cfg.tau(d))
                s, z, c_max = ops.fold(s, z, c_max, f, c, v[:, :, start:stop].to(torch.float32))
            out.s, out.z, out.c_max = s, z, c_max
        if summary.kmin is not None:
            out.kmin, out.kmax = _update_pages(summary, k, lo, hi, cfg.page_size)
        return out

    # ------------------------------------------------------------ decode (SPEC 3, 5, 6)

    def decode(self, q, k, v, summary: Summary, cfg: Config) -> tuple[torch.Tensor, DecodeStats]:
        """Attention of ``q [B,Hq,d]`` over the cache: exact on sink+tail+Top-K, phi completion for the rest."""
        dims = _check_inputs(q, k, v)
        batch, n_q, n_kv, n_tokens, d, dv = dims
        check_compatible(summary, cfg, n_tokens)
        fmap = cfg.feature_map_for(d)
        if fmap is not None:
            fmap.check_heads(n_kv)
        tau = cfg.tau(d)
        regions = Regions.of(n_tokens, cfg.n_sink, cfg.n_tail)

        reads = self.select(q, k, summary, cfg)
        phi = None
        if fmap is not None and not reads.covers_mid:  # a budget over all of mid is exact attention
            kind, norm_coef, w_q, b_q, w_k, b_k = self._map_tensors(fmap, q.device)
            active = reads.n_selected < regions.n_mid
            phi = PhiTensors(kind, norm_coef, w_q, b_q, w_k, b_k, summary.s, summary.z, summary.c_max, active)
        out, rho = self.attend(q, k, v, reads, phi, tau)

        counts = read_counts(cfg, 0, regions.n_mid, phi is not None, fmap, d, dv)
        summary_reads = phi.active.to(torch.float32) * counts.summary if phi is not None else 0.0
        stats = DecodeStats(
            rho=rho,
            selected=reads.selected,
            n_selected=reads.n_selected,
            tokens_read=reads.n_read,
            token_equivalents=reads.n_read.to(torch.float32) + summary_reads + counts.selection,
            n_tokens=n_tokens,
        )
        return out, stats

    def select(self, q: torch.Tensor, k: torch.Tensor, summary: Summary, cfg: Config) -> ReadSet:
        """The read set of one step (SPEC 3): ``idx [B,Hkv,R]`` = anchors, ``T`` ascending, -1 pads."""
        batch, n_q, d = q.shape
        n_kv, n_tokens = k.shape[1], k.shape[2]
        regions = Regions.of(n_tokens, cfg.n_sink, cfg.n_tail)
        dev = q.device
        n_mid, mid_start, mid_end = regions.n_mid, regions.mid_start, regions.mid_end
        tau = cfg.tau(d)
        qf = q.to(torch.float32).reshape(batch, n_kv, n_q // n_kv, d)
        if cfg.selection == "exact":
            covers_mid = n_selected_tokens(cfg.top_k, n_mid) >= n_mid
        else:
            covers_mid = n_selected_pages(cfg.top_k, cfg.page_size, summary.n_pages) >= summary.n_pages
        if covers_mid:  # includes an empty mid
            selected = torch.arange(mid_start, mid_end, device=dev).expand(batch, n_kv, n_mid)
            n_sel = torch.full((batch, n_kv), n_mid, dtype=torch.int64, device=dev)
        elif cfg.selection == "exact":
            n_take = n_selected_tokens(cfg.top_k, n_mid)
            best = ops.exact_candidates(qf, k, mid_start, mid_end, tau)
            selected = ops.topk_ascending(best, n_take) + mid_start
            n_sel = torch.full((batch, n_kv), n_take, dtype=torch.int64, device=dev)
        else:
            n_take = n_selected_pages(cfg.top_k, cfg.page_size, summary.n_pages)
            bound = ops.page_bounds(qf, summary.kmin, summary.kmax, tau)
            pages = ops.topk_ascending(bound, n_take)
            pages = torch.where(pages >= 0, pages + summary.first_page, -1)
            selected, n_sel = ops.page_tokens(pages, cfg.page_size, mid_start, mid_end)
        anchors = torch.cat([torch.arange(regions.sink_end, device=dev), torch.arange(mid_end, n_tokens, device=dev)])
        idx = torch.cat([anchors.expand(batch, n_kv, -1), selected], dim=-1)
        return ReadSet(idx, n_sel + anchors.numel(), n_sel, anchors.numel(), covers_mid)

    def attend(self, q, k, v, reads: ReadSet, phi: PhiTensors | None, tau: float):
        """Exact attention over ``reads`` merged with the summary's estimate of the rest (SPEC 5).

        ``q [B,Hq,d]``, ``k [B,Hkv,N,d]``, ``v [B,Hkv,N,dv]`` -> ``(out [B,Hq,dv] in q.dtype,
        rho [B,Hq] float32)``; ``phi=None`` is Top-K only.
        """
        batch, n_q, d = q.shape
        n_kv = k.shape[1]
        qf = q.to(torch.float32).reshape(batch, n_kv, n_q // n_kv, d)
        k_read, v_read = ops.gather_tokens(k, reads.idx), ops.gather_tokens(v, reads.idx)
        scores = (qf @ k_read.transpose(-1, -2)) * tau  # [B,Hkv,G,R]
        scores = scores.masked_fill(~reads.valid[:, :, None], ops.NEG_INF)
        state = ops.exact_state(scores, v_read)
        rho = torch.zeros_like(state.l)
        if phi is not None:
            estimate = ops.phi_state(*ops.phi_completion(qf, scores, k_read, v_read, reads.retrieved, phi, tau))
            state = ops.state_merge(state, estimate)
            rho = ops.mass_fraction(estimate, state)
        out = ops.state_normalize(state)
        return out.reshape(batch, n_q, -1).to(q.dtype), rho.reshape(batch, n_q)

    def dense(self, q, k, v, scale: float | None = None) -> torch.Tensor:
        """Exact softmax attention over the whole cache, ``[B,Hq,dv]`` in q's dtype."""
        d = _check_inputs(q, k, v).d
        tau = scale if scale is not None else d**-0.5
        native = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
        cast = (lambda x: x) if native else (lambda x: x.to(torch.float32))  # fused CUDA kernels sum in fp32
        out = torch.nn.functional.scaled_dot_product_attention(
            cast(q)[:, :, None], cast(k), cast(v), scale=tau, enable_gqa=True
        )
        return out[:, :, 0].to(q.dtype)

    # ------------------------------------------------------------ helpers

    def _map_tensors(self, fmap: FeatureMap, device: torch.device) -> tuple:
        """``(kind, norm_coef, w_q, b_q, w_k, b_k)`` as float32 tensors on ``device``, converted once."""
        key = (id(fmap), str(device))
        hit = self._params.get(key)
        if hit is not None and hit[0] is fmap:
            return hit[1]
        if fmap.kind == "taylor2":
            tensors = ("taylor2", 0.0, None, None, None, None)
        else:
            params = (fmap.w_q, fmap.b_q, fmap.w_k, fmap.b_k)
            conv = [torch.as_tensor(p, dtype=torch.float32, device=device) for p in params]
            tensors = (fmap.kind, float(fmap.norm_coef), *conv)
        if len(self._params) >= 64:
            self._params.clear()
        self._params[key] = (fmap, tensors)
        return tensors


def _check_inputs(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"the torch backend needs torch tensors; {name} is {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; expected float16, bfloat16, float32 or float64")
    devices = {x.device for x in (q, k, v) if x is not None}
    if len(devices) > 1:
        raise ValueError(f"q, k, v live on different devices: {sorted(map(str, devices))}")
    return check_shapes(q, k, v)



def _update_pages(summary: Summary, k: torch.Tensor, lo: int, hi: int, page_size: int):
    """kmin/kmax after folding ``[lo, hi)``: only the touched pages are recomputed, written into the
    buffers behind the summary's views (grown by doubling), so the cost is independent of N."""
    first, n_pages = page_span(summary.mid_start, hi, page_size)
    p0 = max(lo // page_size, first)
    start = max(p0 * page_size, summary.mid_start)
    kmin_new, kmax_new = ops.page_extrema(k, start, hi, p0, page_size)
    kept = p0 - first
    views = []
    for old, new in ((summary.kmin, kmin_new), (summary.kmax, kmax_new)):
        buf = old._base if _is_prefix_view(old) else old
        if buf.dtype != k.dtype or buf.device != k.device:
            buf = buf.to(device=k.device, dtype=k.dtype)
        buf = ops.grow_pages(buf, kept, n_pages)
        buf[:, :, kept:n_pages] = new
        views.append(buf[:, :, :n_pages])
    return views[0], views[1]


def _is_prefix_view(x: torch.Tensor) -> bool:
    base = x._base
    return (
        base is not None
        and base.dim() == 4
        and base.shape[:2] == x.shape[:2]
        and base.shape[3] == x.shape[3]
        and base.storage_offset() == x.storage_offset()  # data_ptr() is 0 for an empty view
        and base.stride() == x.stride()
    )
