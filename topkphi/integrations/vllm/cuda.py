"""topkphi as a vLLM attention backend on CUDA GPUs: vLLM's ``TRITON_ATTN`` for prefill, topkphi's
Triton kernels (its ``triton`` backend) for decode. Imported by vLLM through the registry.

Written against vLLM 0.32's ``triton_attn.py`` but never run: the CUDA vLLM wheel does not
reach the GPU machine this project tests on. Its device-independent parts (planning, the side
store, the decode loop, ``PlainLayout``) are the CPU backend's and are tested there.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from topkphi.integrations.vllm.attention import BuilderMixin, ImplMixin
from topkphi.integrations.vllm.paged import PlainLayout


class TopKPhiCUDABackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls() -> type[TopKPhiCUDAImpl]:
        return TopKPhiCUDAImpl

    @staticmethod
    def get_builder_cls() -> type[TopKPhiCUDAMetadataBuilder]:
        return TopKPhiCUDAMetadataBuilder


class TopKPhiCUDAMetadataBuilder(BuilderMixin, TritonAttentionMetadataBuilder):
    # the decode loop reads block tables on the host: no CUDA graph captures attention
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_topkphi()


class TopKPhiCUDAImpl(ImplMixin, TritonAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_topkphi()

    def _layout(self, layer, kv_cache: torch.Tensor) -> PlainLayout:
        return PlainLayout()  # [nb, Hkv, bs, 2d] with rows [k | v], whatever the strides
