"""Triton backend: the torch backend with its decode hot path replaced by Triton kernels.

- attend: the gather of the read set, the online softmax, the phi completion with the retrieved
  tokens' share subtracted, and the one normalization run in one fused kernel
  (``topkphi/kernels/triton_decode.py``).
- page selection (the deployable path): the Quest bound (with sub-block maxima) in one read of the
  page metadata, then one kernel per KV head that thresholds, finds the bound at the cut and writes
  the chosen pages' read index and the step's counts (``topkphi/kernels/triton_select.py``). With
  the fused decode that is four launches per step and no host sync (capture it in a CUDA graph).

Exact selection and summary upkeep stay in torch.
"""

from __future__ import annotations

import os
import sys

import torch

from topkphi.backends.base import DecodeStats
from topkphi.backends.torch_backend import TorchBackend, _check_inputs
from topkphi.backends.torch_ops import NEG_INF, PhiTensors, ReadSet
from topkphi.backends.triton_launch import PhiInputs, fused_decode
from topkphi.backends.triton_select import PageReadSet, fits, page_read_set
from topkphi.config import Config
from topkphi.reads import read_counts
from topkphi.regions import Regions, n_selected_pages
from topkphi.summary import Summary, check_compatible

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self, fast_select: bool = True) -> None:
        super().__init__()
        self.fast_select = fast_select  # False: torch page selection (the reference path)

    # ------------------------------------------------------------ decode step

    def decode(self, q, k, v, summary: Summary, cfg: Config):
        """As ``TorchBackend.decode``; page selection runs the Triton selection path."""
        plan = self._page_plan(q, k, v, summary, cfg)
        if plan is None:
            return super().decode(q, k, v, summary, cfg)
        try:
            return self._page_decode(q, k, v, summary, cfg, plan)
        except Exception as err:  # a kernel that cannot build here: say so, keep decoding
            if os.environ.get("TOPKPHI_STRICT"):
                raise
            print(f"topkphi triton: page fast path failed ({type(err).__name__}: {err}); "
                  "using the torch selection from now on", file=sys.stderr)
            self.fast_select = False
            return super().decode(q, k, v, summary, cfg)

    def select(self, q, k, summary: Summary, cfg: Config) -> ReadSet:
        """As ``TorchBackend.select``; page selection through the Triton kernels where it applies."""
        plan = self._page_plan(q, k, None, summary, cfg)
        if plan is None:
            return super().select(q, k, summary, cfg)
        regions, n_take, fmap, d, dv = plan
        return page_read_set(q, summary, cfg.tau(d), n_take, cfg.page_size, regions)

    def _page_plan(self, q, k, v, summary: Summary, cfg: Config):
        """``(regions, n_take, fmap, d, dv)`` when the Triton page path applies, else None."""
        if not self.fast_select or cfg.selection != "page" or summary.kmin is None:
            return None
        if not (q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
            return None
        if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or (v is not None and v.dtype != q.dtype):
            return None
        if summary.kmin.dtype not in KERNEL_DTYPES or summary.kmin.device != q.device:
            return None
        n_tokens = k.shape[2]
        if summary.n_tokens != n_tokens or q.dim() != 3 or k.dim() != 4:
            return None  # let the torch path raise its errors
        n_pages = summary.n_pages
        n_take = n_selected_pages(cfg.top_k, cfg.page_size, n_pages)
        if n_take >= n_pages or not fits(n_take, cfg.page_size):
            return None  # covers mid (exact attention) or too large for one program
        d = q.shape[-1]
        dv = v.shape[-1] if v is not None else d
        return Regions.of(n_tokens, cfg.n_sink, cfg.n_tail), n_take, cfg.feature_map_for(d), d, dv

    def _page_decode(self, q, k, v, summary: Summary, cfg: Config, plan):
        _check_inputs(q, k, v)
        check_compatible(summary, cfg, k.shape[2])
        regions, n_take, fmap, d, dv = plan
        if fmap is not None:
            fmap.check_heads(k.shape[1])
        tau = cfg.tau(d)
        # n_take < n_pages and every page holds a mid token: no head covers mid, the summary is
        # active for every head (TorchBackend: active = n_selected < n_mid, all True here)
        counts = read_counts(cfg, 0, regions.n_mid, fmap is not None, fmap, d, dv)
        # the map's tensors first: the decode kernel chains onto the selection kernel, so nothing may run
        # between them
        map_tensors = self._map_tensors(fmap, q.device) if fmap is not None else None
        reads = page_read_set(q, summary, tau, n_take, cfg.page_size, regions, counts.summary, counts.selection)
        phi = None
        if fmap is not None:
            kind, norm_coef, w_q, b_q, w_k, b_k = map_tensors
            active = None if kind != "taylor2" else reads.n_selected < regions.n_mid
            phi = PhiTensors(kind, norm_coef, w_q, b_q, w_k, b_k, summary.s, summary.z, summary.c_max, active)
        out, rho = self.attend(q, k, v, reads, phi, tau)
        stats = DecodeStats(
            rho=rho,
            selected=reads.selected,
            n_selected=reads.n_selected,
            tokens_read=reads.n_read,
            token_equivalents=reads.token_equivalents,
            n_tokens=k.shape[2],
        )
        return out, stats

    # ------------------------------------------------------------ attention over the read set

    def attend(self, q, k, v, reads: ReadSet, phi: PhiTensors | None, tau: float):
        """As ``TorchBackend.attend``, fused; taylor2 maps and unusual dtypes take the torch path."""
        same_dtype = q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_DTYPES
        if not same_dtype or (phi is not None and phi.kind == "taylor2"):
            return super().attend(q, k, v, reads, phi, tau)
        fast = isinstance(reads, PageReadSet) and reads.n_read32 is not None
        inputs = None
        if phi is not None:
            if phi.active is None:  # PageReadSet without a covering head: every head is active
                c_max = phi.c_max
            else:  # heads whose read set covers mid get no completion: -inf marks an empty summary
                c_max = torch.where(phi.active, phi.c_max, torch.full_like(phi.c_max, NEG_INF))
            n_anchor = reads.n_anchor32 if fast else torch.full_like(reads.n_read, reads.n_anchor)
            inputs = PhiInputs(phi.w_q, phi.b_q, phi.w_k, phi.b_k, phi.norm_coef, phi.s, phi.z, c_max, n_anchor)
        n_read = reads.n_read32 if fast else reads.n_read
        return fused_decode(q, k, v, reads.idx, n_read, scale=tau, phi=inputs, chained=fast and reads.chained)
