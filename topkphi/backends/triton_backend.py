"""Triton backend: the torch backend with the decode hot path in Triton kernels (``topkphi/triton``).

It overrides two primitives of ``topkphi.backends.base.Backend``; the rest (summaries, exact and
compact selection, the fitted estimators) is the torch backend's:

- ``read_set``: page and compact selection in two kernels, the Quest bound (or the compact tokens'
  scores, SPEC 8.2) and a threshold select that writes the read index: no sort, no host sync;
- ``attend``: one fused kernel and its merge (gather, online softmax, split-K merge, one normalization)
  with the estimate of the unread mid inside: the feature map, the clusters (per-cluster sums of the
  retrieved rows in the read tiles, C pseudo-tokens in the merge, SPEC 8.1) or the unread compact pages
  as pseudo-tokens (SPEC 8.2; their logits come from the selection kernels of the same step).

``triton_path`` is the one switch between each kernel and its torch twin; where torch runs it says
why, and ``TritonBackend.last_path`` keeps the path the last step took (``estimate`` says where the
estimate of the unread mid ran). Launch choices are explicit
(``TritonTuning``). With chained launches (sm90+) a page step is four launches (bound, select,
decode, merge) and no host sync: capture it in a CUDA graph. Example::

    be = topkphi.get_backend("triton", tuning=TritonTuning(chain_launches=False))
    out, stats = be.decode(q, k, v, be.build_summary(k, v, cfg), cfg)   # be.last_path: where it ran
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from topkphi.backends.torch_backend import TorchBackend
from topkphi.backends.torch_ops import gather_tokens
from topkphi.config import Config
from topkphi.step import ReadSet, StepPlan, plan_step
from topkphi.summary import Summary
from topkphi.triton.decode import ClusterInputs, Estimate, FeatureMapInputs, fused_decode
from topkphi.triton.launch import TritonTuning, chains_launches, runnable_on
from topkphi.triton.select import KernelReadSet, compact_read_set, fits, page_read_set

TRITON = "triton"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class TritonPath:
    """Where a decode step runs its two hot primitives and its estimate: ``"triton"``, or ``"torch: <why>"``
    (``estimate`` is ``""`` for a step without one)."""

    select: str = ""
    attend: str = ""
    estimate: str = ""


def triton_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, summary: Summary, cfg: Config) -> TritonPath:
    """The one switch: which primitives of ``decode(q, k, v, summary, cfg)`` run Triton kernels.

    Its two halves are judged where the skeleton hands each primitive its inputs (``read_set`` has no
    ``v``); both live here so that the whole decision reads in one place."""
    plan = plan_step(cfg, summary, k.shape[2], q.shape[-1], v.shape[-1], k.shape[1])
    select, attend = _select_path(q, summary, plan, cfg), _attend_path(q, k, v, cfg)
    return TritonPath(select, attend, _estimate_path(plan, select, attend))


def _select_path(q: torch.Tensor, summary: Summary, plan: StepPlan, cfg: Config) -> str:
    if plan.selection == "all":
        return "torch: the budget covers mid (exact attention, nothing to rank)"
    if plan.budget != "fixed":
        return (f"torch ops: the {plan.budget} budget's selection (rank, cumulative mass, certificate; SPEC 10) "
                "has no Triton kernel yet")
    if plan.selection == "exact":
        return "torch: exact selection has no Triton kernel (page and compact selection have)"
    if not runnable_on(q):
        return "torch: CPU tensors need TRITON_INTERPRET=1 to run Triton kernels"
    kmin = summary.pages.kmin if plan.selection == "page" else summary.pages.kappa
    if q.dtype not in KERNEL_DTYPES or kmin.dtype not in KERNEL_DTYPES:
        return f"torch: the bound kernel takes fp16/bf16/fp32, got q {q.dtype}, pages {kmin.dtype}"
    if kmin.device != q.device:
        raise ValueError(f"the summary's pages live on {kmin.device}, the query on {q.device}")
    if not fits(plan.n_take, cfg.page_size):
        return f"torch: {plan.n_take} pages of {cfg.page_size} tokens exceed one selection program"
    return TRITON


def _attend_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Config) -> str:
    if not runnable_on(q):
        return "torch: CPU tensors need TRITON_INTERPRET=1 to run Triton kernels"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_DTYPES):
        return f"torch: the decode kernel takes one of fp16/bf16/fp32 for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
    if cfg.estimator == "feature_map" and not cfg.feature_map_for(q.shape[-1]).exp_linear:
        return "torch: taylor2 is not exp-linear (its m = 1 + d + d^2 features do not fit a program)"
    return TRITON


def _estimate_path(plan: StepPlan, select: str, attend: str) -> str:
    if plan.estimator is None:
        return ""
    if attend != TRITON:
        return attend
    if plan.estimator == "compact" and select != TRITON:
        return "torch: the compact pages' pseudo-tokens take their logits from the selection kernels"
    return TRITON


class TritonBackend(TorchBackend):
    """``TorchBackend`` with ``read_set`` (page selection) and ``attend`` in Triton where ``triton_path`` says."""

    name = "triton"

    def __init__(self, tuning: TritonTuning | None = None) -> None:
        super().__init__()
        if tuning is not None and not isinstance(tuning, TritonTuning):
            raise TypeError(f"tuning must be a TritonTuning, got {type(tuning).__name__}")
        self.tuning = tuning or TritonTuning()
        self.last_path = TritonPath()  # where the last read_set / attend ran

    def read_set(self, q, k, summary: Summary, plan: StepPlan, cfg: Config, tau: float) -> ReadSet:
        path = _select_path(q, summary, plan, cfg)
        self.last_path = replace(self.last_path, select=path)
        if path != TRITON:
            return super().read_set(q, k, summary, plan, cfg, tau)
        chained, warps = chains_launches(q, self.tuning), self.tuning.select_warps
        if plan.selection == "compact":
            return compact_read_set(q, summary.pages, tau, plan.n_take, cfg.page_size, plan.regions, chained=chained,
                                    select_warps=warps)
        return page_read_set(q, summary.pages, summary.first_page, tau, plan.n_take, cfg.page_size, plan.regions,
                             chained=chained, select_warps=warps)

    def unit_masses(self, q, k, summary: Summary, plan: StepPlan, cfg: Config, tau: float):
        """Per-head budgets select in torch ops (``_select_path`` says so in ``last_path``)."""
        self.last_path = replace(self.last_path, select=_select_path(q, summary, plan, cfg))
        return super().unit_masses(q, k, summary, plan, cfg, tau)

    def attend(self, q, k, v, reads: ReadSet, ops, summary: Summary, cfg: Config, tau: float):
        path = _attend_path(q, k, v, cfg)
        from_kernels = isinstance(reads, KernelReadSet)
        est_path = "" if ops is None else path
        if ops is not None and path == TRITON and cfg.estimator == "compact" and not (from_kernels and reads.pages):
            est_path = "torch: the compact pages' pseudo-tokens take their logits from the selection kernels"
        self.last_path = replace(self.last_path, attend=path, estimate=est_path)
        if path != TRITON:
            return super().attend(q, k, v, reads, ops, summary, cfg, tau)
        inputs = {}
        if ops is not None and cfg.estimator == "feature_map":  # completed inside the kernel
            inputs["feature_map"] = self._feature_map_inputs(cfg, summary, reads.n_anchor, q)
        elif ops is not None and cfg.estimator == "cluster":
            st = summary.estimate
            inputs["clusters"] = ClusterInputs(st.count, st.ksum, st.vsum, st.beta, st.labels, reads.n_anchor)
        elif ops is not None and est_path == TRITON:  # compact pages from this step's selection kernels
            inputs["pages"] = reads.pages
        elif ops is not None:  # estimated in torch, merged in the kernel as one more partial state
            inputs["estimate"] = self._outside_estimate(q, k, v, reads, ops, summary, cfg, tau)
        t = self.tuning
        return fused_decode(q, k, v, reads.idx, reads.n_read32 if from_kernels else reads.n_read, scale=tau,
                            split=t.decode_split, page_split=t.decode_page_split, block_n=t.decode_block_n,
                            num_warps=t.decode_warps, chained=from_kernels and reads.chained, phi_dot16=t.phi_dot16,
                            **inputs)

    # ------------------------------------------------------------ the estimates' inputs

    def _feature_map_inputs(self, cfg: Config, summary: Summary, n_anchor: int, q: torch.Tensor) -> FeatureMapInputs:
        fmap = cfg.feature_map_for(q.shape[-1])
        # converted once per map and device and cached: a chained decode must not read a fresh copy
        _, norm_coef, w_q, b_q, w_k, b_k = self._map_tensors(fmap, q.device)
        state = summary.estimate
        return FeatureMapInputs(w_q, b_q, w_k, b_k, norm_coef, state.s, state.z, state.c_max, n_anchor)

    @staticmethod
    def _outside_estimate(q, k, v, reads: ReadSet, ops, summary: Summary, cfg: Config, tau: float) -> Estimate:
        """The estimator ops' ``(lam, n_phi, d_phi)`` over the read set's rows, as the kernel's extra state."""
        # only T's rows: the estimators subtract the retrieved tokens and never read the anchors or scores
        retrieved_only = ReadSet(reads.selected, reads.n_selected, 0)
        batch, n_q, d = q.shape
        q_g = q.to(torch.float32).reshape(batch, k.shape[1], n_q // k.shape[1], d)
        k_t, v_t = gather_tokens(k, retrieved_only.idx), gather_tokens(v, retrieved_only.idx)
        lam, n_phi, d_phi = ops.estimate(q_g, k_t, v_t, retrieved_only.idx >= 0, retrieved_only, summary, cfg, tau)
        return Estimate.of(lam, n_phi, d_phi)


__all__ = ["TritonBackend", "TritonPath", "TritonTuning", "triton_path"]
