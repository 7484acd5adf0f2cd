"""Generation with an mlx-lm model, dense or through topkphi, keeping the cache across turns."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from topkphi.generation.base import Engine
from topkphi.generation.stats import GenerationStats
from topkphi.integrations.mlx_lm import cache_totals, make_cache, topkphi_attention

# mlx_lm/__init__.py re-exports a function named `generate`, which hides the module of that name
stream_generate = importlib.import_module("mlx_lm.generate").stream_generate


class MLXEngine(Engine):
    """An mlx-lm model; ``cfg=None`` decodes densely, otherwise through topkphi."""

    def _new_cache(self) -> list:
        if self.cfg is None:
            return make_prompt_cache(self.model)
        return make_cache(self.model, self.cfg, self.backend)

    def _cached_length(self) -> int:
        return self.cache[0].offset

    def _crop(self, n: int) -> None:
        trim_prompt_cache(self.cache, n)

    def _route(self):
        return topkphi_attention(self.model)

    def stream(self, prompt: list[int], max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
        """Yield the reply's text as it is generated; ``prompt`` is the whole conversation's tokens."""
        if seed is not None:
            mx.random.seed(seed)
        self._fit_prompt(prompt)
        new = self._reuse_cache(prompt)
        for layer in self.cache:
            if hasattr(layer, "steps"):
                layer.steps, layer.rho_sum, layer.read_sum = 0, 0.0, 0.0
        sampler = make_sampler(temp=temp, top_p=top_p if top_p < 1.0 else 0.0)
        reply: list[int] = []
        response = None
        with self.routing():
            for response in stream_generate(self.model, self.tokenizer, mx.array(new), max_tokens=max_tokens,
                                            sampler=sampler, prompt_cache=self.cache):
                if response.finish_reason != "stop":
                    reply.append(response.token)
                yield response.text
        self.tokens = prompt + reply
        if response is not None:
            self.stats = GenerationStats(
                prompt_tokens=response.prompt_tokens,
                prefill_s=response.prompt_tokens / response.prompt_tps if response.prompt_tps else 0.0,
                generated_tokens=response.generation_tokens,
                decode_s=response.generation_tokens / response.generation_tps if response.generation_tps else 0.0,
                fit_s=self.fit_s,
            )
            if self.cfg is not None:
                self.stats.rho, self.stats.read_fraction = cache_totals(self.cache)
