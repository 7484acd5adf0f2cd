"""Record each attention layer's post-RoPE queries, keys and values during a forward pass.

Analyses (head inspection, calibration, evaluation) replay decode steps on these arrays with the
float64 oracle: the query at position t with the cache ``[0, t]`` is exactly the decode step
that produced token t+1.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


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
