"""HF transformers: topkphi as a registered attention function plus a cache layer that keeps the summary.

Prefill runs the model's own SDPA path; decode steps (one query token, no padding mask) run
topkphi. The KV cache stays a standard ``DynamicCache``: its full-attention layers are
``TopKPhiLayer`` objects that keep the summary and fold tokens into it as they leave the tail.
A fitted summary (SPEC 8) is fitted at the first decode step from the last ``fit_window`` query
rows of the prefill, which the attention function hands to the layer as the prefill runs.

    with topkphi_attention(model):
        cache = TopKPhiCache(model, topkphi.Config(top_k=256), get_backend("torch"))
        model(input_ids, **cache_kwargs(model, cache))
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from topkphi.backends.base import Backend
from topkphi.capture import ReferenceRows
from topkphi.config import Config

ATTENTION_NAME = "topkphi"
# transformers gives the cache to ``update`` but not to the attention function that runs right after
# it in the same module: ``update`` leaves its layer here, the attention function takes it (a weak
# reference, so a dropped cache is not kept alive)
_UPDATED_LAYER: ContextVar[weakref.ref | None] = ContextVar("topkphi_updated_layer", default=None)


def cache_kwargs(model, cache) -> dict:
    """The forward keyword for a cache: ``cache`` in recent transformers, ``past_key_values`` before
    (the old name warns now and goes away in a later release)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


class DecodeTotals:
    """Running sums of decode diagnostics, kept on the device so decoding never waits for them."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.steps = 0
        self.rho: torch.Tensor | float = 0.0
        self.read_fraction: torch.Tensor | float = 0.0
        self.head_reads: list[torch.Tensor] = []  # per-head budgets (SPEC 10): each step's [B*Hkv] read fractions
        self.budget: list[torch.Tensor] = []  # per step: [delta_hat, delta_bar, capped] means over heads

    def add(self, rho: torch.Tensor, token_equivalents: torch.Tensor, n_tokens: int, budget=None) -> None:
        self.steps += 1
        self.rho = self.rho + rho.float().mean()
        self.read_fraction = self.read_fraction + token_equivalents.float().mean() / n_tokens
        if budget is not None:
            self.head_reads.append(token_equivalents.float().flatten() / n_tokens)
            certified = budget.delta_bar if budget.delta_bar is not None else torch.full_like(budget.delta_hat, -1.0)
            self.budget.append(torch.stack([budget.delta_hat.float().mean(), certified.float().mean(),
                                            budget.capped.float().mean()]))

    def budget_summary(self) -> dict | None:
        """Per-head budgets: p95 of the per-head read fraction, mean estimated (and certified) dropped mass,
        share of head-steps the cap stopped; None without per-head budgets."""
        if not self.budget:
            return None
        means = torch.stack(self.budget).mean(0).tolist()
        reads = torch.cat(self.head_reads)
        return {"reads_p95": float(torch.quantile(reads, 0.95)), "delta_hat": means[0],
                "delta_bar": means[1] if means[1] >= 0 else None, "capped": means[2]}

    def means(self) -> tuple[float, float]:
        """``(mean rho, mean fraction of the KV read)`` over every layer's decode steps."""
        if self.steps == 0:
            return 0.0, 1.0
        return float(self.rho) / self.steps, float(self.read_fraction) / self.steps


class TopKPhiLayer(DynamicLayer):
    """A full-attention cache layer with topkphi's side state.

    Keys and values live in buffers that grow by doubling, so a decode step appends in place
    instead of copying the whole cache as ``torch.cat`` would.
    """

    def __init__(self, cfg: Config, backend: Backend, totals: DecodeTotals) -> None:
        super().__init__()
        self.cfg, self.backend, self.totals = cfg, backend, totals
        self.summary = None
        self.reference = ReferenceRows(cfg.fit_window, lambda rows: torch.cat(rows, dim=2),
                                       lambda x: x.detach().clone(memory_format=torch.contiguous_format))
        self.n_tokens = 0
        self._k_buf = self._v_buf = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[-2]
        self._reserve(key_states, value_states, self.n_tokens + n_new)
        self._k_buf[:, :, self.n_tokens : self.n_tokens + n_new] = key_states
        self._v_buf[:, :, self.n_tokens : self.n_tokens + n_new] = value_states
        self.n_tokens += n_new
        keys, values = self._k_buf[:, :, : self.n_tokens], self._v_buf[:, :, : self.n_tokens]
        self.keys, self.values = keys, values
        if self.summary is not None:
            self.summary = self.backend.append(self.summary, keys, values, self.cfg)
        elif not self.cfg.fitted:  # a fitted summary waits for the prefill's query rows (see decode)
            self.summary = self.backend.build_summary(keys, values, self.cfg)
        _UPDATED_LAYER.set(weakref.ref(self))
        return keys, values

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        if self._k_buf is not None and self._k_buf.shape[2] >= needed:
            return
        capacity = max(needed, 2 * (0 if self._k_buf is None else self._k_buf.shape[2]), 256)
        batch, n_kv, _, d = key_states.shape
        k_buf = key_states.new_empty(batch, n_kv, capacity, d)
        v_buf = value_states.new_empty(batch, n_kv, capacity, value_states.shape[-1])
        if self._k_buf is not None:
            k_buf[:, :, : self.n_tokens] = self._k_buf[:, :, : self.n_tokens]
            v_buf[:, :, : self.n_tokens] = self._v_buf[:, :, : self.n_tokens]
        self._k_buf, self._v_buf = k_buf, v_buf

    def get_seq_length(self) -> int:
        return self.n_tokens

    def observe(self, query: torch.Tensor) -> None:
        """A multi-token forward's post-RoPE ``query [B,Hq,L,d]``: kept (its last rows) while a
        fitted summary waits for its reference queries; tokens appended to a summary are folded."""
        if self.summary is None and self.cfg.fitted:
            self.reference.add(query, self.n_tokens)

    def decode(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One decode step for ``query [B,Hq,d]``; returns ``[B,Hq,dv]``."""
        if self.summary is None:  # the first step after a prefill fits the summary
            queries = self.reference.take(query, self.n_tokens)
            self.summary = self.backend.build_summary(keys, values, self.cfg, queries=queries)
        out, stats = self.backend.decode(query, keys, values, self.summary, self.cfg)
        self.totals.add(stats.rho, stats.token_equivalents, stats.n_tokens, stats.budget)
        return out

    def _invalidate(self) -> None:
        self.summary = None  # rebuilt from the cache (and refitted from the rows that run next)
        self.reference.clear()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            self.n_tokens = max(0, self.n_tokens + tokens_to_remove)
            self.keys, self.values = self._k_buf[:, :, : self.n_tokens], self._v_buf[:, :, : self.n_tokens]
            self._invalidate()
        elif tokens_to_remove > 0:
            super().crop(tokens_to_remove)

    def reset(self) -> None:
        self.n_tokens, self._k_buf, self._v_buf = 0, None, None
        self._invalidate()
        super().reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("topkphi caches do not support beam search or batch expansion")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("topkphi caches do not support beam search or batch selection")


class TopKPhiCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers carry topkphi summaries.

    ``cfg`` is one Config for every layer, or a function ``layer_idx -> Config`` (per-layer
    learned maps). The model's own attention scale is used for the summary's features.
    """

    def __init__(self, model, cfg: Config | Callable[[int], Config], backend: Backend) -> None:
        super().__init__(config=model.config)
        self.totals = DecodeTotals()
        scales = {m.layer_idx: m.scaling for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")}
        for i, layer in enumerate(self.layers):
            if type(layer) is not DynamicLayer:  # sliding-window and linear layers stay as they are
                continue
            layer_cfg = cfg(i) if callable(cfg) else cfg
            if layer_cfg.scale is None and i in scales:
                layer_cfg = layer_cfg.replace(scale=float(scales[i]))
            self.layers[i] = TopKPhiLayer(layer_cfg, backend, self.totals)


def topkphi_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: topkphi on decode steps, the model's SDPA otherwise."""
    layer = _updated_layer(key)
    if layer is not None and query.shape[2] == 1 and attention_mask is None:
        out = layer.decode(query[:, :, 0], key, value)
        return out[:, None], None  # [B, 1, Hq, dv], as the SDPA path returns
    if layer is not None and query.shape[2] > 1:
        layer.observe(query)
    # prefill, a plain cache, or a padded batch whose mask topkphi does not apply: exact attention
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _updated_layer(key: torch.Tensor) -> TopKPhiLayer | None:
    """The ``TopKPhiLayer`` whose ``update`` returned ``key`` just before this attention call, if any."""
    ref = _UPDATED_LAYER.get()
    _UPDATED_LAYER.set(None)
    layer = None if ref is None else ref()
    return layer if layer is not None and layer.keys is key else None


def register() -> None:
    """Make ``attn_implementation="topkphi"`` known to transformers (idempotent, stateless)."""
    AttentionInterface.register(ATTENTION_NAME, topkphi_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def topkphi_attention(model) -> Iterator[None]:
    """Route ``model``'s attention through topkphi inside the block; restore its own on exit.

    Only caches made by ``TopKPhiCache`` switch decoding to topkphi; any other cache gets exact attention.
    """
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
