"""Generation with an mlx-lm model, dense or through topkphi, keeping the cache across turns."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from topkphi.backends.base import Backend
from topkphi.config import Config
from topkphi.generation.stats import GenerationStats, common_prefix
from topkphi.integrations.mlx_lm import cache_totals, make_cache, topkphi_attention

# mlx_lm/__init__.py re-exports a function named `generate`, which hides the module of that name
stream_generate = importlib.import_module("mlx_lm.generate").stream_generate


class MLXEngine:
    """``cfg=None`` decodes densely (the baseline); otherwise topkphi with ``backend``."""

    def __init__(self, model, tokenizer, cfg: Config | None, backend: Backend | None) -> None:
        self.model, self.tokenizer, self.cfg, self.backend = model, tokenizer, cfg, backend
        self.cache = None
        self.tokens: list[int] = []
        self.stats = GenerationStats()

    def reset(self) -> None:
        self.cache, self.tokens = None, []

    def _new_cache(self) -> list:
        if self.cfg is None:
            return make_prompt_cache(self.model)
        return make_cache(self.model, self.cfg, self.backend)

    def stream(self, prompt: list[int], max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
        """Yield the reply's text as it is generated; ``prompt`` is the whole conversation's tokens."""
        if seed is not None:
            mx.random.seed(seed)
        new = self._reuse_cache(prompt)
        for layer in self.cache:
            if hasattr(layer, "steps"):
                layer.steps, layer.rho_sum, layer.read_sum = 0, 0.0, 0.0
        sampler = make_sampler(temp=temp, top_p=top_p if top_p < 1.0 else 0.0)
        reply: list[int] = []
        response = None
        with _routing(self.model, self.cfg):
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
            )
            if self.cfg is not None:
                self.stats.rho, self.stats.read_fraction = cache_totals(self.cache)

    def _reuse_cache(self, prompt: list[int]) -> list[int]:
        cached = 0 if self.cache is None else self.cache[0].offset  # the last reply token is not cached yet
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1, cached)
        if keep == 0:
            self.cache = self._new_cache()
            keep = 0
        else:
            trim_prompt_cache(self.cache, cached - keep)
        self.tokens = prompt[:keep]
        return prompt[keep:]

    def generate(self, prompt: list[int], max_tokens: int = 32) -> list[int]:
        """Greedy token ids (for tests and evaluation)."""
        self.reset()
        for _ in self.stream(prompt, max_tokens=max_tokens):
            pass
        return self.tokens[len(prompt):]


def _routing(model, cfg):
    if cfg is None:
        from contextlib import nullcontext

        return nullcontext()
    return topkphi_attention(model)
