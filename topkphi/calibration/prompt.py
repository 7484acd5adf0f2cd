"""Per-prompt learned maps: fit the feature maps on a prompt's own prefill queries before decoding it.

A generation engine calls a ``PromptFitter`` whenever a prompt starts a new cache (a conversation's
first turn, or the first after a reset): the prompt's prefill runs as a capture of every layer's q/k/v
(the cache is then loaded from it, so no pass is added), and the maps are fitted from scratch, or a phi
file's are refined, within a budget: a number of Adam steps per layer, or seconds of fitting. A time
budget is kept within a step or two: the first layer measures what a layer's setup and a step cost, and a
fit that cannot give every layer one step says so after that layer and decodes with the fallback. Later
turns keep the maps. Fitting runs in torch, on the model's GPU for a CUDA model, on the CPU otherwise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from topkphi.calibration.fit import FitOptions, LayerFit, fit_layer, min_tokens
from topkphi.capture import LayerCapture, capture_ids
from topkphi.config import Config
from topkphi.feature_maps import FeatureMap

# the fit that gave 1.7-2.05x lower output error than Top-K on held-out text (docs/RESULTS.md): a small
# learning rate from a warm start, the merged output's error weighted in, one query every 8 positions
PROMPT_LR = 0.02
PROMPT_MERGE_WEIGHT = 100.0
PROMPT_STRIDE = 8
PROMPT_QUERIES = 1024  # the prompt's last queries: their mids are most like the decode steps'
FULL_FIT_STEPS = 300  # from scratch: 30 steps gave ~1.1x, 100 ~1.6x, 300 ~2.1x lower error than Top-K (RESULTS.md)
LEARNED_FEATURES = 16  # m of maps fitted here: 16 generalized better than 32 in every fit measured (RESULTS.md)
UNBOUNDED_STEPS = 1_000_000  # a time budget's step cap: the deadline ends the fit
clock = time.perf_counter  # the fit's deadlines are read on this clock (tests replace both)


@dataclass
class PromptFit:
    cfg: Config | Callable[[int], Config]  # what the cache takes: one config, or one per layer
    seconds: float  # the fit alone (the capture is the prompt's prefill)
    note: str | None = None  # what the fit did, or why none ran


@dataclass
class BudgetedFit:
    fits: list[LayerFit | None]  # per layer; None: the layer got no step (it keeps the fallback)
    note: str | None  # why the fit stopped short, if it did


def fit_within(layers: Sequence[LayerCapture], opts: FitOptions, init_maps: Sequence[FeatureMap] | None = None,
               seconds: float | None = None) -> BudgetedFit:
    """Fit every layer on one sequence's captures: ``opts.steps`` Adam steps each; with ``seconds``, at most
    that many, as the budget allows, shared evenly over the layers (setup included, within a step or two)."""
    n_layers = len(layers)
    if init_maps is not None and len(init_maps) != n_layers:
        raise ValueError(f"the warm start has {len(init_maps)} layers, the model has {n_layers}")
    init = (lambda i: None) if init_maps is None else (lambda i: init_maps[i])
    if seconds is None:
        return BudgetedFit([fit_layer([layers[i]], opts, i, init(i)) for i in range(n_layers)], None)
    start = clock()
    end = start + seconds
    fits: list[LayerFit | None] = []
    setup = step = scoring = None  # a layer's costs, measured on the layers fitted so far
    for i in range(n_layers):
        began = clock()
        share = (end - began) / (n_layers - i)
        layer_opts, deadline = opts, began + share  # the first layer: steps until its share is spent
        if setup is not None:
            # the steps that fit the layer's share of what is left, at least one; the deadline only guards
            # against a slowdown in the middle of the layer
            planned = max(1, int((share - setup - scoring) / step))
            layer_opts = dataclasses.replace(opts, steps=min(opts.steps, planned))
            deadline = began + max(share, setup + 2 * step)
        stamps: list[float] = []
        fit = fit_layer([layers[i]], layer_opts, i, init(i),
                        on_step=lambda n, loss, stamps=stamps: stamps.append(clock()), deadline=deadline)
        done = clock()
        fits.append(fit if fit.steps > 0 else None)
        if len(stamps) > 1:
            step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        elif stamps and step is None:  # one step seen: split its time with the setup until a layer takes two
            step = (stamps[0] - began) / 2
        if stamps:
            setup, scoring = stamps[0] - began - step, done - stamps[-1]
        if i == 0:
            # one layer's setup, first step and scoring: what every layer needs at the least
            least = (stamps[0] - began + scoring) if stamps else done - began
            if least * n_layers > seconds:
                return BudgetedFit([None] * n_layers, f"one Adam step per layer needs ~{least * n_layers:.0f} s on "
                                   f"this prompt ({least:.2f} s a layer x {n_layers} layers), more than the "
                                   f"{seconds:g} s budget")
    skipped = sum(f is None for f in fits)
    note = f"{skipped} of {n_layers} layers got no step within {seconds:g} s" if skipped else None
    return BudgetedFit(fits, note)


class PromptFitter:
    """Fits maps on a prompt for ``net`` (``framework`` "torch" or "mlx"); the engine calls ``capture`` (the
    prefill) and ``fit``, and ``too_short`` for prompts with too few queries.

    The budget is ``steps`` Adam steps per layer, or ``time_budget_s`` seconds of fitting. ``init_maps`` (a
    phi file's, one per layer) warm-start the fit and serve prompts too short to fit on; without them such
    prompts decode Top-K only (their context is mostly read exactly anyway)."""

    def __init__(self, net, framework: str, cfg: Config, time_budget_s: float | None = None,
                 n_features: int = LEARNED_FEATURES, init_maps: Sequence[FeatureMap] | None = None,
                 notify: Callable[[str], None] | None = None, steps: int | None = None,
                 device: str | None = None) -> None:
        if (time_budget_s is None) == (steps is None):
            raise ValueError("give the per-prompt fit a budget of seconds or of steps, not both")
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError(f"the per-prompt fit budget must be > 0 seconds, got {time_budget_s}")
        if steps is not None and steps < 1:
            raise ValueError(f"the per-prompt fit needs >= 1 step per layer, got {steps}")
        self.net, self.framework, self.cfg = net, framework, cfg
        self.budget, self.steps = time_budget_s, steps
        self.init_maps = None if init_maps is None else list(init_maps)
        self.notify = notify  # told when a fit starts: it holds up the reply for the budget
        m = n_features if self.init_maps is None else self.init_maps[0].n_features
        self.opts = FitOptions(n_features=m, n_sink=cfg.n_sink, n_tail=cfg.n_tail, top_k=cfg.top_k,
                               steps=steps or UNBOUNDED_STEPS, lr=PROMPT_LR, stride=PROMPT_STRIDE,
                               merge_weight=PROMPT_MERGE_WEIGHT, seed=cfg.seed,
                               device=device or _device_of(net, framework))

    @property
    def min_prompt(self) -> int:
        """The shortest prompt that gives calibration queries."""
        return min_tokens(self.opts)

    def fallback(self, layer: int | None = None) -> Config | Callable[[int], Config]:
        """What decodes without a fit: the file's maps (per layer), else Top-K only."""
        if self.init_maps is None:
            return self.cfg.replace(feature_map=None)
        configs = [self.cfg.replace(feature_map=f, n_features=f.n_features) for f in self.init_maps]
        return configs[layer] if layer is not None else (lambda i: configs[i])

    def _using(self) -> str:
        return "the phi file's maps" if self.init_maps is not None else "Top-K only"

    def too_short(self, n_tokens: int) -> PromptFit:
        return PromptFit(self.fallback(), 0.0, f"prompt of {n_tokens} tokens is too short to fit phi on (needs "
                         f"{self.min_prompt} with these budgets): {self._using()}")

    def capture(self, ids: Sequence[int]) -> list[LayerCapture]:
        """The prompt's prefill, keeping every layer's k/v and its last ``PROMPT_QUERIES`` queries."""
        return capture_ids(self.net, list(ids), self.framework, PROMPT_QUERIES)

    def fit(self, layers: Sequence[LayerCapture]) -> PromptFit:
        if self.notify is not None:
            budget = f"{self.steps} Adam steps per layer" if self.steps else f"up to {self.budget:g} s"
            self.notify(f"fitting phi on the prompt ({budget})...")
        start = clock()
        result = fit_within(layers, self.opts, self.init_maps, self.budget)
        seconds = clock() - start
        done = [f for f in result.fits if f is not None]
        if not done:
            return PromptFit(self.fallback(), seconds, f"phi: no fit: {result.note}: {self._using()} (raise "
                             "--fit-seconds, or give --fit-steps)")
        configs = [self.fallback(i) if f is None and self.init_maps is not None
                   else self.cfg.replace(feature_map=None) if f is None
                   else self.cfg.replace(feature_map=f.fmap, n_features=f.fmap.n_features)
                   for i, f in enumerate(result.fits)]
        steps = round(sum(f.steps for f in done) / len(done))
        note = (f"phi: m = {self.opts.n_features} maps fitted on the prompt's last {layers[0].q.shape[2]} queries, "
                f"{steps} Adam steps per layer in {seconds:.1f} s")
        if result.note:
            note += f" ({result.note}: {self._using()} there)"
        if steps < FULL_FIT_STEPS:
            note += f"; the measured gain needs ~{FULL_FIT_STEPS} steps"
        return PromptFit(lambda i: configs[i], seconds, note)

    def __call__(self, prompt: Sequence[int]) -> PromptFit:
        """Capture and fit in one call (without the engine's cache reuse)."""
        if len(prompt) < self.min_prompt:
            return self.too_short(len(prompt))
        return self.fit(self.capture(prompt))


def _device_of(net, framework: str) -> str:
    """Fit where a torch model runs (a CUDA model fits on its GPU); MLX models fit in torch on the CPU."""
    return next(net.parameters()).device.type if framework == "torch" else "cpu"
