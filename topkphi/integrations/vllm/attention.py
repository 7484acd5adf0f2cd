"""What every topkphi vLLM backend adds to the vLLM backend it extends (``cpu.py``, ``cuda.py``).

The metadata builder asks vLLM to put decode rows (one query token) first, plans them, and
builds the wrapped backend's own metadata for the rest of the batch. The implementation runs
the wrapped backend's kernel on those rows (prefill, chunked prefill, mixed batches) and
topkphi on the decode rows. Cache writes stay the wrapped backend's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from topkphi.integrations.vllm.options import VllmOptions
from topkphi.integrations.vllm.paged import DecodePlan, plan_decodes
from topkphi.integrations.vllm.store import PagedDecoder, worker

logger = logging.getLogger("vllm.topkphi")  # under vLLM's logger: its format, level and process prefix
_PER_REQUEST = ("seq_lens_cpu_upper_bound", "is_prefilling", "req_idx", "encoder_seq_lens", "encoder_seq_lens_cpu",
                "dcp_local_seq_lens", "dcp_local_seq_lens_cpu_upper_bound", "rswa_prefix_lens",
                "replayssm_decode_base_cpu")


@dataclass
class TopKPhiMetadata:
    """One step's decode plan and the wrapped backend's metadata for the rows after the decodes."""

    decodes: DecodePlan
    prefill: Any | None


def batch_tail(cm, n: int):
    """Rows ``n:`` of vLLM's ``CommonAttentionMetadata`` as a batch of their own."""
    t = int(cm.query_start_loc_cpu[n])
    changes = {
        "query_start_loc": cm.query_start_loc[n:] - cm.query_start_loc[n],
        "query_start_loc_cpu": cm.query_start_loc_cpu[n:] - t,
        "seq_lens": cm.seq_lens[n:],
        "num_reqs": cm.num_reqs - n,
        "num_actual_tokens": cm.num_actual_tokens - t,
        "block_table_tensor": cm.block_table_tensor[n:],
        "slot_mapping": cm.slot_mapping[t:],
        "causal": cm.causal[n:] if isinstance(cm.causal, torch.Tensor) else cm.causal,
        "positions": None if cm.positions is None else cm.positions[t:],
        "mm_req_doc_ranges": None if cm.mm_req_doc_ranges is None else
        {i - n: r for i, r in cm.mm_req_doc_ranges.items() if i >= n},
        "_num_computed_tokens_cache": None,
        "_token_to_req_indices_cache": None,
    }
    for name in _PER_REQUEST:
        value = getattr(cm, name, None)
        if value is not None:
            changes[name] = value[n:]
    known = {f.name for f in dataclasses.fields(cm)}
    return dataclasses.replace(cm, **{k: v for k, v in changes.items() if k in known})


class BuilderMixin:
    """Put before the wrapped backend's metadata builder in the bases."""

    def _init_topkphi(self) -> None:
        self._init_reorder_batch_threshold(1)  # vLLM moves one-token rows to the front
        self._step = 0

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False) -> TopKPhiMetadata:
        cm = common_attn_metadata
        self._step += 1
        seq_lens = cm.seq_lens if cm.seq_lens.device.type == "cpu" else cm.seq_lens.cpu()
        plan = plan_decodes(self._step, cm.query_start_loc_cpu, seq_lens, cm.block_table_tensor,
                            cm.slot_mapping[: cm.num_actual_tokens], self.kv_cache_spec.block_size)
        n = len(plan.rows)
        prefill = super().build(common_prefix_len, batch_tail(cm, n), fast_build) if n < cm.num_reqs else None
        return TopKPhiMetadata(plan, prefill)


class ImplMixin:
    """Put before the wrapped backend's implementation in the bases; ``_layout`` reads its cache."""

    def _init_topkphi(self) -> None:
        from vllm.config import get_current_vllm_config
        from vllm.utils.torch_utils import is_quantized_kv_cache
        from vllm.v1.attention.backend import AttentionType

        unsupported = [name for name, bad in (
            ("sliding-window attention", self.sliding_window not in (None, -1, (-1, -1))),
            ("ALiBi", self.alibi_slopes is not None),
            ("logit soft-capping", self.logits_soft_cap not in (None, 0)),
            ("attention sinks", self.sinks is not None),
            ("encoder or cross attention", self.attn_type != AttentionType.DECODER),
            (f"a {self.kv_cache_dtype} KV cache", is_quantized_kv_cache(self.kv_cache_dtype)),
        ) if bad]
        if unsupported:
            raise NotImplementedError(f"topkphi's vLLM backend does not support {', '.join(unsupported)}; "
                                      "serve this model with vLLM's own attention backend")
        self._options = VllmOptions.from_additional_config(get_current_vllm_config().additional_config)
        self._decoder: PagedDecoder | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:  # profiling and warm-up runs
            return super().forward(layer, query, key, value, kv_cache, None, output, output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("topkphi's vLLM backend does not fuse output quantization")
        plan, n = attn_metadata.decodes, attn_metadata.decodes.n_tokens
        if attn_metadata.prefill is not None:
            tail = (None if x is None else x[n:] for x in (query, key, value))
            super().forward(layer, *tail, kv_cache, attn_metadata.prefill, output[n:])
        self._decoder_for(kv_cache)(query, kv_cache, self._layout(layer, kv_cache), plan, output)
        return output

    def _decoder_for(self, kv_cache: torch.Tensor) -> PagedDecoder:
        if self._decoder is None:
            opts = self._options
            backend = opts.backend
            if backend == "auto":
                from topkphi.backends.registry import available_backends

                backend = "triton" if kv_cache.is_cuda and "triton" in available_backends() else "torch"
            cfg = opts.config.replace(scale=float(self.scale))
            if not worker().decoders:
                logger.info("topkphi decodes with its %s backend: %s; side buffers up to %d MiB in this worker",
                            backend, cfg, opts.max_side_mib)
            self._decoder = PagedDecoder(cfg, backend, worker().memory_for(opts.max_side_bytes))
            worker().decoders.append(self._decoder)
        return self._decoder

    def _layout(self, layer, kv_cache: torch.Tensor):
        raise NotImplementedError
