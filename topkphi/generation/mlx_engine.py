"""Generation with an mlx-lm model, dense or through topkphi, keeping the cache across turns."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from topkphi.generation.base import Engine
from topkphi.generation.stats import GenerationStats
from topkphi.integrations.mlx_lm import TopKPhiKVCache, cache_totals, make_cache, topkphi_attention

# mlx_lm/__init__.py re-exports a function named `generate`, which hides the module of that name
stream_generate = importlib.import_module("mlx_lm.generate").stream_generate
PREFILL_STEP = 512  # tokens per prefill chunk in ``feed``: bounds the attention scores' memory


class MLXEngine(Engine):
    """An mlx-lm model; ``cfg=None`` decodes densely, otherwise through topkphi."""

    def __init__(self, model, tokenizer, cfg, backend, **kw) -> None:
        super().__init__(model, tokenizer, cfg, backend, **kw)
        ids = getattr(tokenizer, "eos_token_ids", None) or [getattr(tokenizer, "eos_token_id", None)]
        self.eos = {i for i in ids if i is not None}
        floats = [x.dtype for _, x in tree_flatten(model.parameters()) if mx.issubdtype(x.dtype, mx.floating)]
        self.dtype = floats[0] if floats else mx.float32  # what the model's activations (and its cache) hold

    @property
    def head_dims(self) -> tuple[int, int]:
        args = self.model.args
        d = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        return d, d

    def _new_cache(self) -> list:
        if self.cfg is None:
            return make_prompt_cache(self.model)
        return make_cache(self.model, self.cfg, self.backend)

    def _layer_lengths(self) -> list[int]:
        return [c.offset for c in self.cache]

    def _crop_layers(self, length: int) -> None:
        for c in self.cache:
            if c.offset > length:
                c.trim(c.offset - length)

    def _route(self):
        return topkphi_attention(self.model)

    def _forward(self, ids: list[int]) -> mx.array:
        """Next-token logits after ``ids``: the prefill runs in chunks that evaluate the cache only, so the
        LM head runs for the last token alone."""
        for start in range(0, len(ids) - 1, PREFILL_STEP):
            self.model(mx.array([ids[start : min(start + PREFILL_STEP, len(ids) - 1)]]), cache=self.cache)
            mx.eval([c.state for c in self.cache])
        return self.model(mx.array([ids[-1:]]), cache=self.cache)[0, -1]

    def _to_numpy(self, logits: mx.array) -> np.ndarray:
        return np.array(logits.astype(mx.float32))

    def _load_layers(self, layers) -> None:
        for c, (k, v) in zip(self.cache, layers):
            c.update_and_fetch(*(mx.array(x).astype(self.dtype) if isinstance(x, np.ndarray) else x for x in (k, v)))

    def _observe_layers(self, queries) -> None:
        for c, rows in zip(self.cache, queries):
            c.observe(mx.array(rows).astype(self.dtype) if isinstance(rows, np.ndarray) else rows)

    def _layer_kv(self) -> list[tuple]:
        return [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in self.cache]

    def _totals(self) -> tuple[float, float]:
        return cache_totals(self.cache)

    def stream(self, prompt: list[int], max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
        """Yield the reply's text as it is generated; ``prompt`` is the whole conversation's tokens."""
        if seed is not None:
            mx.random.seed(seed)
        self._fit_prompt(prompt)
        new = self._reuse_cache(prompt)
        for layer in self.cache:
            if isinstance(layer, TopKPhiKVCache):  # count this reply's decode steps only
                layer.steps, layer.rho_sum, layer.read_sum = 0, 0.0, 0.0
        sampler = make_sampler(temp=temp, top_p=top_p if top_p < 1.0 else 0.0)
        reply: list[int] = []
        response = None
        try:
            with self.routing():
                for response in stream_generate(self.model, self.tokenizer, mx.array(new), max_tokens=max_tokens,
                                                sampler=sampler, prompt_cache=self.cache):
                    if response.finish_reason != "stop":
                        reply.append(response.token)
                    yield response.text
        finally:
            self._settle(prompt + reply)
            self.stats = self._add_prefilled(_stats(response))
            if self.cfg is not None and response is not None:
                self.stats.rho, self.stats.read_fraction = cache_totals(self.cache)


def _stats(response) -> GenerationStats:
    if response is None:
        return GenerationStats()
    return GenerationStats(
        prompt_tokens=response.prompt_tokens,
        prefill_s=response.prompt_tokens / response.prompt_tps if response.prompt_tps else 0.0,
        generated_tokens=response.generation_tokens,
        decode_s=response.generation_tokens / response.generation_tps if response.generation_tps else 0.0,
    )
