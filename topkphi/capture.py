"""Record post-RoPE queries: every layer's arrays for analyses, and the reference rows a cache fits from.

Analyses (head inspection, calibration, evaluation) replay decode steps on ``LayerCapture``
arrays with the float64 oracle: the query at position t with the cache ``[0, t]`` is exactly
the decode step that produced token t+1. ``ReferenceRows`` is what the model integrations keep
per layer while a prefill runs: the last ``fit_window`` query rows, SPEC 8's reference queries.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from topkphi.summary import ReferenceQueries


@dataclass
class LayerCapture:
    q: np.ndarray  # [B, Hq, L, d] float32, the last L query positions
    k: np.ndarray  # [B, Hkv, N, d] float32, every key
    v: np.ndarray  # [B, Hkv, N, dv]
    scale: float

    def decode_step(self, position: int, batch: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(q [1,Hq,d], k [1,Hkv,t+1,d], v)`` of the decode step at absolute ``position`` (t)."""
        n_tokens, n_queries = self.k.shape[2], self.q.shape[2]
        j = position - (n_tokens - n_queries)
        if not 0 <= j < n_queries:
            raise ValueError(f"position {position} was not captured (last {n_queries} of {n_tokens})")
        sl = slice(batch, batch + 1)
        return self.q[sl, :, j], self.k[sl, :, : position + 1], self.v[sl, :, : position + 1]

    def reference_queries(self, end: int, window: int, batch: int = 0) -> ReferenceQueries:
        """The rows ``end - window .. end - 1`` (fewer if fewer were captured): what a cache whose
        prefill ended at ``end`` fits its summary from (SPEC 8)."""
        n_tokens, n_queries = self.k.shape[2], self.q.shape[2]
        stop = end - (n_tokens - n_queries)
        if not 0 < stop <= n_queries:
            raise ValueError(f"rows before {end} were not captured (last {n_queries} of {n_tokens})")
        start = max(0, stop - window)
        return ReferenceQueries(self.q[batch : batch + 1, :, start:stop], end=end)


class ReferenceRows:
    """The last ``window`` query rows ``[B,Hq,<=W,d]`` a cache's prefill produced (SPEC 8).

    A prefill may run in chunks (mlx-lm's prefill step, chunked HF prefill), so the summary is
    fitted only when decoding starts, from the rows of every chunk. ``copy`` must return a new
    buffer: a slice would keep the chunk's whole query tensor alive. ``concat`` joins along rows.
    """

    def __init__(self, window: int, concat: Callable[[list[Any]], Any], copy: Callable[[Any], Any]) -> None:
        self.window, self.concat, self.copy = window, concat, copy
        self.rows: Any = None
        self.end = 0

    def add(self, q: Any, end: int) -> None:
        """Query rows ``q [B,Hq,L,d]`` of absolute positions ``end - L .. end - 1``."""
        n_rows = q.shape[2]
        if self.rows is not None and end - n_rows != self.end:
            raise ValueError(f"query rows of positions {end - n_rows}..{end - 1} do not follow the rows "
                             f"captured up to {self.end}")
        rows = q[:, :, -self.window:]
        if self.rows is not None and rows.shape[2] < self.window:
            rows = self.concat([self.rows, rows])[:, :, -self.window:]
        self.rows, self.end = self.copy(rows), end

    def take(self, q_step: Any, n_tokens: int) -> ReferenceQueries:
        """The captured rows, then forget them. A cache whose first forward was one token has none:
        then the decode step's own query ``q_step [B,Hq,d]`` (it attends to all ``n_tokens``) is the row."""
        if self.rows is None:
            return ReferenceQueries(q_step[:, :, None], end=n_tokens)
        queries = ReferenceQueries(self.rows, end=self.end)
        self.clear()
        return queries

    def clear(self) -> None:
        self.rows, self.end = None, 0


def capture_torch(model, input_ids, n_queries: int) -> list[LayerCapture]:
    """Run ``model`` on ``input_ids [1, N]`` (a torch tensor) and capture every attention layer."""
    import torch
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    captured: dict[int, LayerCapture] = {}

    def record(module, query, key, value, attention_mask, scaling=None, **kwargs):
        captured[module.layer_idx] = LayerCapture(
            q=query[:, :, -n_queries:].float().cpu().numpy(), k=key.float().cpu().numpy(),
            v=value.float().cpu().numpy(), scale=float(scaling if scaling is not None else query.shape[-1] ** -0.5))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("topkphi_capture", record)
    AttentionMaskInterface.register("topkphi_capture", sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("topkphi_capture")
    try:
        with torch.inference_mode():
            model(input_ids=input_ids)
    finally:
        model.set_attn_implementation(previous)
    return [captured[i] for i in sorted(captured)]


def capture_mlx(model, input_ids, n_queries: int) -> list[LayerCapture]:
    """Run an mlx-lm ``model`` on ``input_ids [1, N]`` (an mx.array) and capture every attention layer."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    layer_of = {id(c): i for i, c in enumerate(cache)}
    captured: dict[int, LayerCapture] = {}

    def recorder(original):
        def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
            as32 = [np.array(x.astype(mx.float32)) for x in (queries[:, :, -n_queries:], keys, values)]
            captured[layer_of[id(cache)]] = LayerCapture(*as32, scale=float(scale))
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

        return scaled_dot_product_attention

    with patch_attention(model, recorder):
        mx.eval(model(input_ids, cache=cache))
    return [captured[i] for i in sorted(captured)]


def capture_ids(net, ids: list[int], framework: str, n_queries: int | None = None) -> list[LayerCapture]:
    """Capture every layer of ``net`` (``framework`` "torch" or "mlx") on token ids; the last ``n_queries``
    query positions (default all)."""
    n_queries = len(ids) if n_queries is None else min(n_queries, len(ids))
    if framework == "torch":
        import torch

        device = next(net.parameters()).device
        return capture_torch(net, torch.tensor([ids], device=device), n_queries)
    import mlx.core as mx

    return capture_mlx(net, mx.array([ids]), n_queries)


@contextmanager
def patch_attention(model, wrap) -> Iterator[None]:
    """Replace ``scaled_dot_product_attention`` in every module ``model`` is built from."""
    modules = {type(m).__module__ for m in model.modules()} | {type(model).__module__}
    patched = []
    for name in sorted(modules):
        module = sys.modules.get(name)
        fn = getattr(module, "scaled_dot_product_attention", None)
        if fn is not None:
            module.scaled_dot_product_attention = wrap(fn)
            patched.append((module, fn))
    if not patched:
        raise ValueError(f"{type(model).__name__} does not call mlx-lm's scaled_dot_product_attention")
    try:
        yield
    finally:
        for module, fn in patched:
            module.scaled_dot_product_attention = fn
