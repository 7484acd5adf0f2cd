"""What the torch and MLX generation engines share: cache reuse across turns and greedy decoding."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

from topkphi.backends.base import Backend
from topkphi.config import Config
from topkphi.generation.stats import GenerationStats, common_prefix


class Engine:
    """``cfg=None`` decodes densely (the baseline); otherwise topkphi with ``backend``.

    Subclasses provide ``stream``, ``_new_cache``, ``_cached_length``, ``_crop`` and ``_route``.
    """

    def __init__(self, model, tokenizer, cfg: Config | None, backend: Backend | None, prompt_fitter=None,
                 notify: Callable[[str], None] | None = None) -> None:
        self.model, self.tokenizer, self.cfg, self.backend = model, tokenizer, cfg, backend
        self.cache = None
        self.tokens: list[int] = []
        self.stats = GenerationStats()
        # per-prompt maps (topkphi.calibration.prompt.PromptFitter): refitted when a prompt starts a new cache
        self.prompt_fitter = None if cfg is None else prompt_fitter
        self.notify = notify
        self.fit_s = 0.0

    def stream(self, prompt: list[int], max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
        """Yield the reply's text as it is generated; ``prompt`` is the whole conversation's tokens."""
        raise NotImplementedError

    def reset(self) -> None:
        self.cache, self.tokens = None, []

    def generate(self, prompt: list[int], max_tokens: int = 32) -> list[int]:
        """Greedy token ids from a fresh cache (for tests and evaluation)."""
        self.reset()
        for _ in self.stream(prompt, max_tokens=max_tokens):
            pass
        return self.tokens[len(prompt):]

    def routing(self):
        """The context in which the model decodes through topkphi (nothing for dense)."""
        return nullcontext() if self.cfg is None else self._route()

    def _kept(self, prompt: list[int]) -> tuple[int, int]:
        """(cached tokens, how many of them ``prompt`` reuses). The last reply token is not in the cache
        yet, and at least one token must run."""
        cached = 0 if self.cache is None else self._cached_length()
        return cached, min(common_prefix(self.tokens, prompt), len(prompt) - 1, cached)

    def _fit_prompt(self, prompt: list[int]) -> None:
        """With a prompt fitter: fit the maps on ``prompt`` when it starts a new cache (run outside the
        topkphi routing: the capture is a dense pass of its own)."""
        self.fit_s = 0.0
        if self.prompt_fitter is None or self._kept(prompt)[1] > 0:
            return
        fit = self.prompt_fitter(prompt)
        self.cfg, self.fit_s, self.cache = fit.cfg, fit.seconds, None
        if fit.note and self.notify is not None:
            self.notify(fit.note)

    def _reuse_cache(self, prompt: list[int]) -> list[int]:
        """Keep the cached prefix shared with ``prompt``; return the tokens still to run."""
        cached, keep = self._kept(prompt)
        if keep == 0:
            self.cache = self._new_cache()
        elif keep < cached:
            self._crop(cached - keep)
        self.tokens = prompt[:keep]
        return prompt[keep:]
