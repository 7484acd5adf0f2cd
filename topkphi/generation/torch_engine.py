"""Generation with an HF transformers model, dense or through topkphi, keeping the cache across turns."""

from __future__ import annotations

import time
from collections.abc import Iterator

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


class TorchEngine(Engine):
    """An HF transformers model; ``cfg=None`` decodes densely, otherwise through topkphi."""

    def __init__(self, model, tokenizer, cfg: Config | None, backend: Backend | None, **kw) -> None:
        super().__init__(model, tokenizer, cfg, backend, **kw)
        self.device = next(model.parameters()).device
        self.eos = _eos_ids(model, tokenizer)

    def _new_cache(self):
        from transformers import DynamicCache

        if self.cfg is None:
            return DynamicCache(config=self.model.config)
        return TopKPhiCache(self.model, self.cfg, self.backend)

    def _cached_length(self) -> int:
        return self.cache.get_seq_length()

    def _crop(self, n: int) -> None:
        for layer in self.cache.layers:
            layer.crop(-n)

    def _route(self):
        return topkphi_attention(self.model)

    def _forward(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.device)
        return self.model(input_ids=input_ids, **cache_kwargs(self.model, self.cache), use_cache=True).logits[0, -1]

    def stream(self, prompt: list[int], max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
        """Yield the reply's text as it is generated; ``prompt`` is the whole conversation's tokens.

        Tokens already in the cache from earlier turns are not computed again.
        """
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self._fit_prompt(prompt)
        with torch.inference_mode(), self.routing():
            new = self._reuse_cache(prompt)
            start = time.perf_counter()
            logits = self._forward(new)
            _sync(self.device)
            self.stats = GenerationStats(prompt_tokens=len(new), prefill_s=time.perf_counter() - start,
                                         fit_s=self.fit_s)
            if self.cfg is not None:
                self.cache.totals.clear()  # count this reply's decode steps only
            reply: list[int] = []
            shown = ""
            start = time.perf_counter()
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
                    logits = self._forward([token])
            _sync(self.device)
            self.stats.decode_s = time.perf_counter() - start
            self.stats.generated_tokens = len(reply)
            self.tokens = prompt + reply
            if self.cfg is not None:
                self.stats.rho, self.stats.read_fraction = self.cache.totals.means()


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
