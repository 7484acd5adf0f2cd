"""Generation with an HF transformers model, dense or through topkphi, keeping the cache across turns."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Iterator

import numpy as np
import torch

from topkphi.backends.base import Backend
from topkphi.config import Config
from topkphi.generation.base import Engine
from topkphi.generation.stats import GenerationStats
from topkphi.integrations.hf import TopKPhiCache, cache_kwargs, topkphi_attention


def sample(logits: torch.Tensor, temp: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at ``temp == 0``, else temperature + nucleus sampling over ``logits [vocab]``."""
    if temp <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temp, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@functools.lru_cache(maxsize=8)
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


class TorchEngine(Engine):
    """An HF transformers model; ``cfg=None`` decodes densely, otherwise through topkphi."""

    def __init__(self, model, tokenizer, cfg: Config | None, backend: Backend | None, **kw) -> None:
        super().__init__(model, tokenizer, cfg, backend, **kw)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos = _eos_ids(model, tokenizer)

    @property
    def head_dims(self) -> tuple[int, int]:
        cfg = self.model.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return d, d

    def _new_cache(self):
        from transformers import DynamicCache

        if self.cfg is None:
            return DynamicCache(config=self.model.config)
        return TopKPhiCache(self.model, self.cfg, self.backend)

    def _layer_lengths(self) -> list[int]:
        return [layer.get_seq_length() for layer in self.cache.layers]

    def _crop_layers(self, length: int) -> None:
        with torch.inference_mode():  # the cache's tensors were made in inference mode
            for layer in self.cache.layers:
                extra = layer.get_seq_length() - length
                if extra > 0:
                    layer.crop(-extra)

    def _route(self):
        return topkphi_attention(self.model)

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits after ``ids``; only the last position's are computed (a prefill skips the
        LM head everywhere else: 49k x 576 per token for SmolLM2)."""
        kwargs = cache_kwargs(self.model, self.cache)
        if _takes_logits_to_keep(type(self.model)):
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            input_ids = torch.tensor([ids], device=self.device)
            return self.model(input_ids=input_ids, **kwargs, use_cache=True).logits[0, -1]

    def _to_numpy(self, logits: torch.Tensor) -> np.ndarray:
        return logits.float().cpu().numpy()

    def _native(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        return x.to(device=self.device, dtype=self.dtype)

    def _load_layers(self, layers) -> None:
        with torch.inference_mode():
            for i, (k, v) in enumerate(layers):
                self.cache.update(self._native(k), self._native(v), i)

    def _observe_layers(self, queries) -> None:
        with torch.inference_mode():
            for layer, rows in zip(self.cache.layers, queries):
                layer.observe(self._native(rows))

    def _layer_kv(self) -> list[tuple]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _totals(self) -> tuple[float, float]:
        return self.cache.totals.means()

    def stream(self, prompt: list[int], max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
        """Yield the reply's text as it is generated; ``prompt`` is the whole conversation's tokens.

        Tokens already in the cache from earlier turns are not computed again.
        """
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self._fit_prompt(prompt)
        new = self._reuse_cache(prompt)
        reply: list[int] = []
        self.stats = GenerationStats(prompt_tokens=len(new))
        decode_start = None
        try:
            start = time.perf_counter()
            with self.routing():
                logits = self._forward(new)
            _sync(self.device)
            self.stats.prefill_s = time.perf_counter() - start
            self._add_prefilled(self.stats)
            if self.cfg is not None:
                self.cache.totals.clear()  # count this reply's decode steps only
            shown = ""
            decode_start = time.perf_counter()
            for _ in range(max_tokens):
                token = sample(logits, temp, top_p, generator)
                if token in self.eos:
                    break
                reply.append(token)
                text = self.tokenizer.decode(reply, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    yield text[len(shown):]
                    shown = text
                if len(reply) < max_tokens:  # the last token enters the cache with the next turn
                    with self.routing():
                        logits = self._forward([token])
            _sync(self.device)
        finally:  # an interrupted reply reports what it did, and leaves a consistent cache
            if decode_start is not None:
                self.stats.decode_s = time.perf_counter() - decode_start
                self.stats.generated_tokens = len(reply)
                if self.cfg is not None:
                    self.stats.rho, self.stats.read_fraction = self.cache.totals.means()
                    self.stats.budget = self.cache.totals.budget_summary()
            self._settle(prompt + reply)

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids
