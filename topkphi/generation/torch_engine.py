"""Generation with an HF transformers model, dense or through topkphi, keeping the cache across turns."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from topkphi.backends.base import Backend
from topkphi.config import Config
from topkphi.generation.stats import GenerationStats, common_prefix
from topkphi.integrations.hf import TopKPhiCache, topkphi_attention


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


class TorchEngine:
    """``cfg=None`` decodes densely (the baseline); otherwise topkphi with ``backend``."""

    def __init__(self, model, tokenizer, cfg: Config | None, backend: Backend | None) -> None:
        self.model, self.tokenizer, self.cfg, self.backend = model, tokenizer, cfg, backend
        self.device = next(model.parameters()).device
        self.eos = _eos_ids(model, tokenizer)
        self.cache = None
        self.tokens: list[int] = []
        self.stats = GenerationStats()

    def reset(self) -> None:
        self.cache, self.tokens = None, []

    def _new_cache(self):
        from transformers import DynamicCache

        if self.cfg is None:
            return DynamicCache(config=self.model.config)
        return TopKPhiCache(self.model, self.cfg, self.backend)

    def _forward(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.device)
        return self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True).logits[0, -1]

    def stream(self, prompt: list[int], max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
        """Yield the reply's text as it is generated; ``prompt`` is the whole conversation's tokens.

        Tokens already in the cache from earlier turns are not computed again.
        """
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        with torch.inference_mode(), _routing(self.model, self.cfg):
            new = self._reuse_cache(prompt)
            start = time.perf_counter()
            logits = self._forward(new)
            _sync(self.device)
            self.stats = GenerationStats(prompt_tokens=len(new), prefill_s=time.perf_counter() - start)
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

    def _reuse_cache(self, prompt: list[int]) -> list[int]:
        """Keep the cached prefix shared with ``prompt``; return the tokens still to run."""
        cached = 0 if self.cache is None else self.cache.get_seq_length()
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1, cached)
        if keep == 0:
            self.cache = self._new_cache()
        elif keep < cached:
            for layer in self.cache.layers:
                layer.crop(keep - cached)
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
