"""Per-prompt learned maps: fit the feature maps on a prompt's own prefill queries before decoding it.

A generation engine calls a ``PromptFitter`` whenever a prompt starts a new cache (a conversation's
first turn, or the first after a reset): one extra dense prefill pass captures every layer's q/k/v, and
``fit_model`` fits the maps from scratch, or refines a phi file's, within a time budget (the fit's alone:
the capture costs one prefill on top). Later turns keep the maps: the summary is built with them and
appended with them. Fitting runs in torch, on the model's GPU for a CUDA model, on the CPU otherwise
(an MLX model included).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from topkphi.calibration.fit import FitOptions, fit_model, min_tokens
from topkphi.capture import capture_ids
from topkphi.config import Config, per_layer_config
from topkphi.feature_maps import FeatureMap

# the fit that gave 1.7-2.05x lower output error than Top-K on held-out text (docs/RESULTS.md): a small
# learning rate from a warm start, the merged output's error weighted in, one query every 8 positions
PROMPT_LR = 0.02
PROMPT_MERGE_WEIGHT = 100.0
PROMPT_STRIDE = 8
PROMPT_QUERIES = 1024  # the prompt's last queries: their mids are most like the decode steps'
FULL_FIT_STEPS = 300  # from scratch: 30 steps gave ~1.1x, 100 ~1.6x, 300 ~2.1x lower error than Top-K (RESULTS.md)


@dataclass
class PromptFit:
    cfg: Config | Callable[[int], Config]  # what the cache takes: one config, or one per layer
    seconds: float  # capture (one extra prefill pass) + fit, added to this turn's prefill
    note: str | None = None  # what the fit did, or why none ran


class PromptFitter:
    """``fitter(prompt_ids) -> PromptFit`` for ``net`` (``framework`` "torch" or "mlx").

    ``init_maps`` (a phi file's, one per layer) warm-start the fit and serve prompts too short to fit
    on; without them such prompts decode Top-K only (their context is mostly read exactly anyway)."""

    def __init__(self, net, framework: str, cfg: Config, time_budget_s: float, n_features: int,
                 init_maps: Sequence[FeatureMap] | None = None, notify: Callable[[str], None] | None = None) -> None:
        if not time_budget_s > 0:
            raise ValueError(f"the per-prompt fit budget must be > 0 seconds, got {time_budget_s}")
        self.net, self.framework, self.cfg, self.budget = net, framework, cfg, float(time_budget_s)
        self.init_maps = None if init_maps is None else list(init_maps)
        self.notify = notify  # told when a fit starts: it holds up the reply for the budget
        m = n_features if self.init_maps is None else self.init_maps[0].n_features
        self.opts = FitOptions(n_features=m, n_sink=cfg.n_sink, n_tail=cfg.n_tail, top_k=cfg.top_k,
                               steps=1_000_000, lr=PROMPT_LR, stride=PROMPT_STRIDE,
                               merge_weight=PROMPT_MERGE_WEIGHT, seed=cfg.seed, device=_device_of(net, framework))

    @property
    def min_prompt(self) -> int:
        """The shortest prompt that gives calibration queries."""
        return min_tokens(self.opts)

    def fallback(self) -> Config | Callable[[int], Config]:
        if self.init_maps is not None:
            return per_layer_config(self.cfg, self.init_maps)
        return self.cfg.replace(feature_map=None)

    def __call__(self, prompt: Sequence[int]) -> PromptFit:
        if len(prompt) < self.min_prompt:
            using = "the phi file's maps" if self.init_maps is not None else "Top-K only"
            return PromptFit(self.fallback(), 0.0, f"prompt of {len(prompt)} tokens is too short to fit phi on "
                             f"(needs {self.min_prompt} with these budgets): {using}")
        if self.notify is not None:
            self.notify(f"fitting phi on the prompt (capture + up to {self.budget:g} s)...")
        start = time.perf_counter()
        layers = capture_ids(self.net, list(prompt), self.framework, PROMPT_QUERIES)
        captured = time.perf_counter()
        fits = fit_model([layers], self.opts, self.init_maps, time_budget_s=self.budget)
        end = time.perf_counter()
        steps = round(sum(f.steps for f in fits) / len(fits))
        note = (f"phi: m = {self.opts.n_features} maps fitted on the prompt's last {layers[0].q.shape[2]} queries, "
                f"{steps} Adam steps per layer; capture {captured - start:.1f} s + fit {end - captured:.1f} s")
        if steps < FULL_FIT_STEPS:
            note += f" (the measured gain needs ~{FULL_FIT_STEPS}: raise --fit-seconds)"
        return PromptFit(per_layer_config(self.cfg, [f.fmap for f in fits]), end - start, note)


def _device_of(net, framework: str) -> str:
    """Fit where a torch model runs (a CUDA model fits on its GPU); MLX models fit in torch on the CPU."""
    return next(net.parameters()).device.type if framework == "torch" else "cpu"
