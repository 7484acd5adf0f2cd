"""mlx-lm: a KVCache subclass that carries the summary, and decode-step routing of mlx-lm's attention.

mlx-lm's model files import ``scaled_dot_product_attention`` by name, so routing patches that
global in each module the loaded model uses, and puts the original back on exit. The routed
function is handed the cache, so it gives a prefill's queries to it: a fitted summary (SPEC 8) is
fitted at the first decode step from the last ``fit_window`` query rows of the prefill (mlx-lm
prefills in chunks and runs the prompt's last token as a step of its own).

    cache = [TopKPhiKVCache(cfg, backend) for _ in model.layers]
    with topkphi_attention(model):
        for response in stream_generate(model, tokenizer, prompt, prompt_cache=cache): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from topkphi.backends.base import Backend
from topkphi.capture import ReferenceRows, patch_attention
from topkphi.config import Config


class TopKPhiKVCache(KVCache):
    """mlx-lm's ``KVCache`` (same keys/values/offset format) plus topkphi's summary."""

    def __init__(self, cfg: Config, backend: Backend) -> None:
        super().__init__()
        self.cfg, self.backend = cfg, backend
        self.summary = None
        self.reference = ReferenceRows(cfg.fit_window, lambda rows: mx.concatenate(rows, axis=2), mx.contiguous)
        self.steps = 0
        self.rho_sum: mx.array | float = 0.0
        self.read_sum: mx.array | float = 0.0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        keys, values = super().update_and_fetch(keys, values)
        if self.summary is not None:
            self.summary = self.backend.append(self.summary, keys, values, self.cfg)
        elif not self.cfg.fitted:  # a fitted summary waits for the prefill's query rows (see decode)
            self.summary = self.backend.build_summary(keys, values, self.cfg)
        return keys, values

    def trim(self, n: int) -> int:
        trimmed = super().trim(n)
        if trimmed:
            self.summary = None  # rebuilt from the cache (and refitted from the rows that run next)
            self.reference.clear()
        return trimmed

    def observe(self, queries: mx.array) -> None:
        """A multi-token forward's post-RoPE ``queries [B,Hq,L,d]``: kept (its last rows) while a
        fitted summary waits for its reference queries; tokens appended to a summary are folded."""
        if self.summary is None and self.cfg.fitted:
            self.reference.add(queries, self.offset)
            mx.async_eval(self.reference.rows)  # evaluated, the rows no longer hold the prefill's graph

    def decode(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
        """One decode step, ``queries [B,Hq,1,d]`` -> ``[B,Hq,1,dv]``."""
        expected = self.cfg.tau(queries.shape[-1])
        if abs(expected - scale) > 1e-6 * scale:
            raise ValueError(f"the cache's summary uses scale {expected:g}, the model attends with {scale:g}: "
                             "pass scale= to make_cache")
        if self.summary is None:  # the first step after a prefill fits the summary
            fit_from = self.reference.take(queries[:, :, 0], self.offset)
            self.summary = self.backend.build_summary(keys, values, self.cfg, queries=fit_from)
        out, stats = self.backend.decode(queries[:, :, 0], keys, values, self.summary, self.cfg)
        self.steps += 1
        self.rho_sum = self.rho_sum + stats.rho.astype(mx.float32).mean()
        self.read_sum = self.read_sum + stats.token_equivalents.astype(mx.float32).mean() / stats.n_tokens
        return out[:, :, None]


def attention_scale(model) -> float | None:
    """The score scale of the model's attention modules (mlx-lm stores it as ``scale``)."""
    for m in model.modules():
        if hasattr(m, "scale") and hasattr(m, "n_kv_heads"):
            return float(m.scale)
    return None


def make_cache(model, cfg: Config | Callable[[int], Config], backend: Backend,
               scale: float | None = None) -> list[TopKPhiKVCache]:
    """One ``TopKPhiKVCache`` per layer; ``cfg`` is one Config or ``layer_idx -> Config`` (learned maps).

    Refuses models whose default cache is not a plain ``KVCache``.
    """
    if hasattr(model, "make_cache"):
        kinds = {type(c).__name__ for c in model.make_cache()}
        if kinds != {"KVCache"}:
            raise ValueError(f"topkphi supports full-attention KV caches only; this model uses {sorted(kinds)}")
    scale = attention_scale(model) if scale is None else scale
    caches = []
    for i in range(len(model.layers)):
        layer_cfg = cfg(i) if callable(cfg) else cfg
        caches.append(TopKPhiKVCache(layer_cfg if scale is None else layer_cfg.replace(scale=float(scale)), backend))
    return caches


def cache_totals(cache: list) -> tuple[float, float]:
    """``(mean rho, mean fraction of the KV read)`` over all decode steps of all layers."""
    layers = [c for c in cache if isinstance(c, TopKPhiKVCache) and c.steps]
    if not layers:
        return 0.0, 1.0
    steps = sum(c.steps for c in layers)
    rho = sum(float(c.rho_sum) for c in layers) / steps
    read = sum(float(c.read_sum) for c in layers) / steps
    return rho, read


def _routed(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(cache, TopKPhiKVCache) and queries.shape[2] == 1 and mask is None and sinks is None:
            if hasattr(cache, "bits"):
                raise ValueError("topkphi does not support quantized KV caches")
            return cache.decode(queries, keys, values, scale)
        if isinstance(cache, TopKPhiKVCache) and queries.shape[2] > 1:
            cache.observe(queries)
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

    return scaled_dot_product_attention


@contextmanager
def topkphi_attention(model) -> Iterator[None]:
    """Route decode steps of ``model``'s attention through topkphi inside the block."""
    with patch_attention(model, _routed):
        yield
