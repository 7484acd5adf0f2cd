"""The torch primitives of the per-head budgets (SPEC 10), float32; the rule is ``topkphi.budget``."""

from __future__ import annotations

import math

import torch

from topkphi.backends import torch_ops as ops
from topkphi.budget import ArrayOps, fragments, page_sizes
from topkphi.config import Config
from topkphi.step import ReadSet, StepPlan
from topkphi.summary import Summary

F32 = torch.float32


class TorchArrayOps(ArrayOps):
    def exp(self, x):
        return torch.exp(x)

    def log(self, x):
        return torch.log(x)

    def logsumexp(self, x):
        return torch.logsumexp(x, dim=-1)  # -inf where every entry is -inf

    def amax(self, x, axis):
        return x.amax(axis)

    def argsort(self, x):
        return torch.sort(x, dim=-1, stable=True).indices

    def take(self, x, idx):
        shape = torch.broadcast_shapes(x.shape[:-1], idx.shape[:-1])
        return torch.gather(x.expand(*shape, x.shape[-1]), -1, idx.expand(*shape, idx.shape[-1]))

    def cumsum(self, x):
        return torch.cumsum(x, dim=-1)

    def flip(self, x):
        return torch.flip(x, dims=(-1,))

    def count(self, mask):
        return mask.sum(-1)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def clip(self, x, lo, hi):
        return x.clamp(lo, hi)

    def arange(self, n, like):
        return torch.arange(n, device=like.device)


def unit_masses(q: torch.Tensor, k: torch.Tensor, summary: Summary, plan: StepPlan, cfg: Config, tau: float):
    """``(logm [B,Hkv,G,U], anchor [B,Hkv,G])`` float32 (see ``Backend.unit_masses``)."""
    batch, n_q, d = q.shape
    n_kv = k.shape[1]
    r, dev = plan.regions, q.device
    q_g = q.to(F32).reshape(batch, n_kv, n_q // n_kv, d)
    exact = [*range(r.sink_end), *range(r.mid_end, r.n_tokens)]
    if plan.selection == "exact":
        logm = tau * q_g @ k[:, :, r.mid_start:r.mid_end].to(F32).transpose(-1, -2)
    elif plan.selection == "page":
        kmin, kmax = (x.to(F32) for x in (summary.pages.kmin, summary.pages.kmax))
        bound = q_g.clamp(min=0) @ kmax.transpose(-1, -2) + q_g.clamp(max=0) @ kmin.transpose(-1, -2)
        sizes = page_sizes(summary.first_page, kmin.shape[2], cfg.page_size, r.mid_start, r.mid_end)
        log_sizes = torch.tensor([math.log(n) if n else -math.inf for n in sizes], dtype=F32, device=dev)
        logm = tau * bound + log_sizes
    else:
        cp = summary.pages
        logm = tau * q_g @ cp.kappa.to(F32).transpose(-1, -2) + cp.beta.to(F32)[:, :, None]
        front, back = fragments(r.mid_start, r.mid_end, cfg.page_size)
        exact += [*front, *back]
    k_exact = k[:, :, torch.tensor(exact, dtype=torch.long, device=dev)].to(F32)
    return logm, torch.logsumexp(tau * q_g @ k_exact.transpose(-1, -2), dim=-1)


def units_read_set(units: torch.Tensor, summary: Summary, plan: StepPlan, cfg: Config) -> ReadSet:
    """The read set of chosen ``units [B,Hkv,W]`` (ascending, -1 padded), in the layout of ``topkphi.step``."""
    r, dev, size = plan.regions, units.device, cfg.page_size
    batch, n_kv = units.shape[:2]
    if plan.selection == "exact":
        selected, n_sel = ops.packed(torch.where(units >= 0, units + r.mid_start, -1))
    else:
        first = summary.first_page if plan.selection == "page" else summary.pages.first_complete
        selected, n_sel = ops.page_tokens(torch.where(units >= 0, units + first, -1), size, r.mid_start, r.mid_end)
    if plan.selection == "compact":
        front, back = fragments(r.mid_start, r.mid_end, size)
        extra = torch.tensor([*front, *back], dtype=torch.long, device=dev).expand(batch, n_kv, -1)
        selected, n_sel = ops.packed(torch.cat([selected, extra], dim=-1))
    anchors = torch.cat([torch.arange(r.sink_end, device=dev), torch.arange(r.mid_end, r.n_tokens, device=dev)])
    idx = torch.cat([anchors.expand(batch, n_kv, -1), selected], dim=-1)
    return ReadSet(idx, n_sel, int(anchors.numel()))
