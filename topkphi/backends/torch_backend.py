"""The PyTorch backend: the SPEC's primitives in eager tensor ops, on CPU or CUDA, in the model's dtype.

``topkphi.backends.base.Backend`` runs the step (build_summary / append / decode); this class
supplies its primitives, vectorized over batch and heads. It is the readable twin of the fused
kernels, and a kernel subclass (Triton) overrides only the hot path:

- ``read_set(q, k, summary, plan, cfg, tau) -> topkphi.step.ReadSet``: which tokens are read exactly
  (``idx [B,Hkv,R]``: sink+tail anchors, then ``T`` ascending, then -1 padding);
- ``attend(q, k, v, reads, ops, summary, cfg, tau) -> (out [B,Hq,dv] in q.dtype, rho [B,Hq], lse [B,Hq])``:
  exact attention over the read set merged with the estimator's estimate of the rest (``ops=None``: Top-K only).

Inputs may be float16, bfloat16, float32 or float64 (computed in float32); every sum is float32 and
so is the summary state (cluster labels int32; Quest bounds keep the cache's dtype). Example::

    be = TorchBackend()
    cfg = topkphi.Config(n_sink=4, n_tail=64, top_k=64, selection="page")
    summary = be.build_summary(k, v, cfg)               # k [B,Hkv,N,d], v [B,Hkv,N,dv]
    out, stats = be.decode(q, k, v, summary, cfg)       # q [B,Hq,d] -> out [B,Hq,dv]
    summary = be.append(summary, k_longer, v_longer, cfg)   # after the cache grows
"""

from __future__ import annotations

import torch

from topkphi.backends import torch_budget, torch_ops
from topkphi.backends import torch_pages as pages
from topkphi.backends.base import Backend, EstimatorOps
from topkphi.backends.torch_estimators import ClusterOps, CompactOps, FeatureMapOps
from topkphi.config import Config, Dims, check_shapes
from topkphi.feature_maps import FeatureMap
from topkphi.step import ReadSet, StepPlan
from topkphi.summary import ReferenceQueries, Summary

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TorchBackend(Backend):
    """Eager PyTorch primitives of the ``Backend`` skeleton (CPU and CUDA tensors)."""

    name = "torch"
    array_ops = torch_budget.TorchArrayOps()

    def __init__(self) -> None:
        self._estimators = {"feature_map": FeatureMapOps(), "cluster": ClusterOps(), "compact": CompactOps()}

    # ------------------------------------------------------------ inputs

    def as_arrays(self, x, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"the torch backend needs torch tensors; {name} is {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; expected float16, bfloat16, float32 or float64")
        return x

    def check_inputs(self, q, k, v) -> Dims:
        devices = {x.device for x in (q, k, v)}
        if len(devices) > 1:
            raise ValueError(f"q, k, v live on different devices: {sorted(map(str, devices))}")
        return check_shapes(q, k, v)

    def estimator_ops(self, cfg: Config) -> EstimatorOps | None:
        return self._estimators.get(cfg.estimator)

    # ------------------------------------------------------------ pages (SPEC 3, 8.2)

    def empty_pages(self, cfg: Config, dims: Dims, like):
        return pages.empty_pages(cfg, dims, like)

    def fold_pages(self, page_meta, summary: Summary, k, v, lo: int, hi: int, cfg: Config):
        return pages.fold_pages(page_meta, summary.mid_start, k, v, lo, hi, cfg)

    def add_query_mass(self, page_meta, k, queries: ReferenceQueries, cfg: Config):
        q = self.as_arrays(queries.q, "queries.q")
        if q.device != k.device:
            raise ValueError(f"reference queries live on {q.device}, the cache on {k.device}")
        return pages.add_query_mass(page_meta, k, queries, cfg)

    def add_tail_mass(self, page_meta, q, k, lse, regions, tau: float):
        return pages.add_tail_mass(page_meta, q, k, lse, regions, tau)

    # ------------------------------------------------------------ selection (SPEC 3, 8.2)

    def read_set(self, q: torch.Tensor, k: torch.Tensor, summary: Summary, plan: StepPlan, cfg: Config,
                 tau: float) -> ReadSet:
        """Anchors (sink asc, tail asc), then each KV head's ``T`` ascending, then -1 padding."""
        batch, n_q, d = q.shape
        n_kv = k.shape[1]
        r, dev = plan.regions, q.device
        q_g = q.to(torch.float32).reshape(batch, n_kv, n_q // n_kv, d)
        if plan.selection == "all":  # the budget covers mid (or mid is empty)
            selected = torch.arange(r.mid_start, r.mid_end, device=dev).expand(batch, n_kv, r.n_mid)
            n_sel = torch.full((batch, n_kv), r.n_mid, dtype=torch.int64, device=dev)
        elif plan.selection == "exact":
            best = torch_ops.exact_candidates(q_g, k, r.mid_start, r.mid_end, tau)
            selected = torch_ops.topk_ascending(best, plan.n_take) + r.mid_start
            n_sel = torch.full((batch, n_kv), plan.n_take, dtype=torch.int64, device=dev)
        elif plan.selection == "page":
            bounds = summary.pages
            chosen = torch_ops.topk_ascending(torch_ops.page_bounds(q_g, bounds.kmin, bounds.kmax, tau), plan.n_take)
            chosen = torch.where(chosen >= 0, chosen + summary.first_page, -1)
            selected, n_sel = torch_ops.page_tokens(chosen, cfg.page_size, r.mid_start, r.mid_end)
        else:
            selected, n_sel = pages.compact_selection(q_g, summary.pages, r, plan.n_take, cfg.page_size, tau)
        anchors = torch.cat([torch.arange(r.sink_end, device=dev), torch.arange(r.mid_end, r.n_tokens, device=dev)])
        idx = torch.cat([anchors.expand(batch, n_kv, -1), selected], dim=-1)
        return ReadSet(idx, n_sel, int(anchors.numel()))

    # ------------------------------------------------------------ per-head budgets (SPEC 10)

    def unit_masses(self, q, k, summary: Summary, plan: StepPlan, cfg: Config, tau: float):
        return torch_budget.unit_masses(q, k, summary, plan, cfg, tau)

    def units_read_set(self, units, summary: Summary, plan: StepPlan, cfg: Config) -> ReadSet:
        return torch_budget.units_read_set(units, summary, plan, cfg)

    # ------------------------------------------------------------ attention (SPEC 5)

    def attend(self, q, k, v, reads: ReadSet, ops: EstimatorOps | None, summary: Summary, cfg: Config,
               tau: float):
        """Exact attention over ``reads`` merged with the estimate of the rest (SPEC 5).

        ``q [B,Hq,d]``, ``k [B,Hkv,N,d]``, ``v [B,Hkv,N,dv]`` -> ``(out [B,Hq,dv] in q.dtype, rho [B,Hq],
        lse [B,Hq])`` float32; ``ops=None`` is Top-K only."""
        batch, n_q = q.shape[:2]
        rows = torch_ops.read_rows(q, k, v, reads, tau)
        state = torch_ops.exact_state(rows.scores, rows.v_read)
        rho = torch.zeros_like(state.l)
        if ops is not None:
            estimate = torch_ops.phi_state(*ops.estimate(rows.q_g, rows.k_read, rows.v_read, rows.retrieved, reads,
                                                    summary, cfg, tau))
            state = torch_ops.state_merge(state, estimate)
            rho = torch_ops.mass_fraction(estimate, state)
        out = torch_ops.state_normalize(state).reshape(batch, n_q, -1).to(q.dtype)
        return out, rho.reshape(batch, n_q), torch_ops.state_lse(state).reshape(batch, n_q)

    def dense(self, q, k, v, scale: float | None = None) -> torch.Tensor:
        """Exact softmax attention over the whole cache, ``[B,Hq,dv]`` in q's dtype."""
        q, k, v = (self.as_arrays(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
        d = self.check_inputs(q, k, v).d
        tau = scale if scale is not None else d**-0.5
        native = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
        cast = (lambda x: x) if native else (lambda x: x.to(torch.float32))  # fused CUDA kernels sum in fp32
        out = torch.nn.functional.scaled_dot_product_attention(
            cast(q)[:, :, None], cast(k), cast(v), scale=tau, enable_gqa=True
        )
        return out[:, :, 0].to(q.dtype)

    # ------------------------------------------------------------ for kernel subclasses

    def _map_tensors(self, fmap: FeatureMap, device: torch.device) -> tuple:
        """``(kind, norm_coef, w_q, b_q, w_k, b_k)`` float32 on ``device`` (converted once, cached)."""
        return self._estimators["feature_map"].map_tensors(fmap, device)
