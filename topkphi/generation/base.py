"""What the torch and MLX generation engines share: cache reuse across turns, the public step API the
evaluation runs on, per-prompt maps, and a cache that stays consistent when a reply is interrupted."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext

import numpy as np

from topkphi.backends.base import Backend
from topkphi.config import Config
from topkphi.generation.stats import GenerationStats, common_prefix


class Engine:
    """``cfg=None`` decodes densely (the baseline); otherwise topkphi with ``backend``.

    Public: ``stream`` (a reply), ``generate``, ``reset``, and the step API ``feed`` / ``load_kv`` / ``kv`` /
    ``decode_totals`` that evaluation uses. Subclasses provide ``stream`` and the framework hooks
    ``_new_cache``, ``_layer_lengths``, ``_crop_layers``, ``_route``, ``_forward``, ``_load_layers``,
    ``_observe_layers``,
    ``_layer_kv``, ``_totals``, ``_clear_totals``, ``head_dims`` and ``eos``.
    """

    def __init__(self, model, tokenizer, cfg: Config | Callable[[int], Config] | None, backend: Backend | None,
                 prompt_fitter=None, notify: Callable[[str], None] | None = None) -> None:
        self.model, self.tokenizer, self.cfg, self.backend = model, tokenizer, cfg, backend
        self.cache = None
        self.tokens: list[int] = []  # the conversation so far; the cache holds a prefix of it
        self.stats = GenerationStats()
        # per-prompt maps (topkphi.calibration.prompt.PromptFitter): refitted when a prompt starts a new cache
        self.prompt_fitter = None if cfg is None else prompt_fitter
        self.notify = notify
        self.fit_s = 0.0
        self.prefilled = (0, 0.0)  # (tokens, seconds) prefilled by the per-prompt fit's capture this reply

    # ---- replies

    def stream(self, prompt: list[int], max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
        """Yield the reply's text as it is generated; ``prompt`` is the whole conversation's tokens.
        Interrupting it (Ctrl-C, or closing the generator) keeps the cache usable for the next reply."""
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

    # ---- the step API (evaluation)

    def feed(self, ids: Sequence[int]) -> np.ndarray:
        """Run ``ids`` through the model into the cache (a new one if there is none); the next-token
        logits after the last of them, ``[vocab]`` float32. One id is a decode step."""
        if self.cache is None:
            self.cache, self.tokens = self._new_cache(), []
        with self.routing():
            logits = self._forward(list(ids))
        self.tokens = self.tokens + list(ids)
        return self._to_numpy(logits)

    def load_kv(self, layers: Sequence[tuple], queries: Sequence | None = None) -> None:
        """A new cache holding these per-layer ``(k [1,Hkv,N,d], v)`` (the framework's arrays or NumPy): the
        topkphi summaries are built from them as a prefill would. ``queries``: per layer the prefill's last
        query rows ``[1,Hq,W,d]`` (ending at N), which fitted summaries (SPEC 8) are fitted from; without
        them a fitted summary has only the first decode step's query to fit from."""
        self.cache = self._new_cache()
        self._load_layers(layers)
        if queries is not None and self.cfg is not None:
            self._observe_layers(queries)
        self.tokens = []

    def kv(self) -> list[tuple]:
        """The cache's per-layer ``(k, v)`` (the framework's arrays)."""
        return self._layer_kv()

    def decode_totals(self) -> tuple[float, float]:
        """``(mean rho, mean fraction of the KV read)`` over the decode steps since the cache was made
        (``(0, 1)`` for dense)."""
        if self.cfg is None or self.cache is None:
            return 0.0, 1.0
        return self._totals()

    # ---- shared by the subclasses' stream

    def _kept(self, prompt: list[int]) -> tuple[int, int]:
        """(cached tokens, how many of them ``prompt`` reuses). The last reply token may not be in the cache,
        and at least one token must run."""
        cached = 0 if self.cache is None else min(self._layer_lengths())
        return cached, min(common_prefix(self.tokens, prompt), len(prompt) - 1, cached)

    def _fit_prompt(self, prompt: list[int]) -> None:
        """With a prompt fitter: when ``prompt`` starts a new cache, capture its q/k/v in one dense pass that is
        also its prefill (the cache is loaded from it), and fit the maps on its queries."""
        self.fit_s, self.prefilled = 0.0, (0, 0.0)
        fitter = self.prompt_fitter
        if fitter is None or self._kept(prompt)[1] > 0:
            return
        if len(prompt) < fitter.min_prompt:
            fit = fitter.too_short(len(prompt))
            self.cfg, self.cache = fit.cfg, None
        else:
            start = time.perf_counter()
            layers = fitter.capture(prompt[:-1])
            captured = time.perf_counter()
            fit = fitter.fit(layers)
            self.cfg = fit.cfg
            self.load_kv([(c.k, c.v) for c in layers], [c.q for c in layers])
            self.tokens = list(prompt[:-1])
            self.fit_s, self.prefilled = fit.seconds, (len(prompt) - 1, captured - start)
        if fit.note and self.notify is not None:
            self.notify(fit.note)

    def _reuse_cache(self, prompt: list[int]) -> list[int]:
        """Keep the cached prefix shared with ``prompt``; return the tokens still to run."""
        cached, keep = self._kept(prompt)
        if keep == 0:
            self.cache = self._new_cache()
        elif keep < cached:
            self._crop_layers(keep)
        self.tokens = prompt[:keep]
        return prompt[keep:]

    def _settle(self, tokens: list[int]) -> None:
        """After a reply, finished or interrupted: ``tokens`` is the conversation, and every layer is cut to
        the length all of them surely hold (an interrupted step may have reached only some layers)."""
        self.tokens = list(tokens)
        if self.cache is None:
            return
        lengths = self._layer_lengths()
        keep = min(len(tokens), *lengths)
        if max(lengths) > keep:
            self._crop_layers(keep)

    def _add_prefilled(self, stats: GenerationStats) -> GenerationStats:
        stats.prompt_tokens += self.prefilled[0]
        stats.prefill_s += self.prefilled[1]
        stats.fit_s = self.fit_s
        return stats
