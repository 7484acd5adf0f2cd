"""Triton backend: the torch backend with its decode hot path replaced by the fused Triton kernel.

Selection (exact scoring or page bounds + ``torch.topk``) and summary upkeep stay in torch: they
are a few large ops per step. The gather of the read set, the online softmax, the phi completion
with the retrieved tokens' share subtracted, and the one normalization run in one kernel.
"""

from __future__ import annotations

import torch

from topkphi.backends.torch_backend import TorchBackend
from topkphi.backends.torch_ops import NEG_INF, PhiTensors, ReadSet
from topkphi.backends.triton_launch import PhiInputs, fused_decode

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonBackend(TorchBackend):
    name = "triton"

    def attend(self, q, k, v, reads: ReadSet, phi: PhiTensors | None, tau: float):
        """As ``TorchBackend.attend``, fused; taylor2 maps and unusual dtypes take the torch path."""
        same_dtype = q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_DTYPES
        if not same_dtype or (phi is not None and phi.kind == "taylor2"):
            return super().attend(q, k, v, reads, phi, tau)
        inputs = None
        if phi is not None:
            # heads whose read set covers mid get no completion: -inf marks an empty summary
            c_max = torch.where(phi.active, phi.c_max, torch.full_like(phi.c_max, NEG_INF))
            n_anchor = torch.full_like(reads.n_read, reads.n_anchor)
            inputs = PhiInputs(phi.w_q, phi.b_q, phi.w_k, phi.b_k, phi.norm_coef, phi.s, phi.z, c_max, n_anchor)
        return fused_decode(q, k, v, reads.idx, reads.n_read, scale=tau, phi=inputs)
