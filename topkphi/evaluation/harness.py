"""Methods x budgets x tasks at matched token-equivalent reads per decode step (SPEC section 6).

What is compared is in ``policies`` (each method's config at a budget, matched reads), how a model is
stepped is in ``runners``, one sample under every policy is in ``runs``; this module holds the
specification of a run, the loop over it, and the means of its rows.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from topkphi.config import Config
from topkphi.evaluation import scoring
from topkphi.evaluation.policies import METHODS, Policy, covers_mid, policy
from topkphi.evaluation.runs import run_sample
from topkphi.evaluation.tasks import QA_TASKS, TASKS, generate


@dataclass
class EvalSpec:
    methods: list[str]
    budgets: list[int]
    tasks: list[str]
    contexts: list[int]
    samples: int = 5
    seed: int = 0
    base: Config = field(default_factory=Config)
    kl_tokens: int = 32
    attn_positions: int = 2
    maps: list | None = None  # learned FeatureMaps, one per layer (a phi file); None: ``base``'s feature map

    def validate(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; expected some of {', '.join(METHODS)}")
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; expected some of {', '.join(TASKS)}")
        for b in self.budgets:
            if b < 1:
                raise ValueError(f"budgets must be >= 1 token, got {b}")
        floor = self.base.n_sink + self.base.n_tail
        for c in self.contexts:
            if c <= floor + 1:
                raise ValueError(f"--context {c} is not longer than sink + tail ({floor}) + 1")
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.kl_tokens < 1 or self.attn_positions < 1:
            raise ValueError("--kl-tokens and --attn-positions must be >= 1")
        if not (self.methods and self.budgets and self.tasks and self.contexts):
            raise ValueError("--methods, --budgets, --tasks and --context need at least one value each")
        if self.maps is not None:
            if not self.maps:
                raise ValueError("the phi file holds no layers")
            if any(getattr(f, "kind", None) != "learned" for f in self.maps):
                raise ValueError("EvalSpec.maps takes learned feature maps, one per layer")

    def covered(self) -> list[tuple[int, int]]:
        """``(context, budget)`` pairs whose budget takes the whole mid: there every method is dense."""
        return [(c, b) for c in self.contexts for b in self.budgets if covers_mid(self.base, b, c)]

    def policies(self, n_tokens: int, d: int, dv: int) -> list[Policy]:
        """Dense first (always: the reference), then every other method at every budget."""
        out = [policy("dense", None, self.base, n_tokens, d, dv)]
        for budget in self.budgets:
            out += [policy(m, budget, self.base, n_tokens, d, dv, self.maps) for m in self.methods if m != "dense"]
        return out


def evaluate(runner, spec: EvalSpec, progress: Callable[[int, str], None] | None = None) -> dict:
    """Every (context, task, sample) under every policy. ``progress(advance, description)`` is called as it goes.

    Returns ``{"rows": per-sample rows, "results": means per (context, task, method, budget)}``.
    """
    spec.validate()
    rows: list[dict] = []
    for context in spec.contexts:
        for task in spec.tasks:
            samples = generate(task, spec.samples, context, spec.seed, runner.encode)
            for sample in samples:
                desc = f"{task} @ {context}, sample {sample.index + 1}/{spec.samples}"
                if progress:
                    progress(0, desc)

                def tick(desc: str = desc) -> None:
                    if progress:
                        progress(1, desc)

                for row in run_sample(runner, spec, sample, tick):
                    rows.append({"context": context, "task": task, "sample": sample.index,
                                 "n_tokens": sample.n_tokens, **row})
                # the engines' caches sit in reference cycles: without this, each sample's KV copies (~1 GB
                # per sample at 8k tokens) wait for a full gc pass, and an 8k run reached 20 GB and was killed
                gc.collect()
    return {"rows": rows, "results": aggregate(rows)}


def n_units(spec: EvalSpec) -> int:
    """Progress units: one per sample per policy."""
    n_policies = 1 + len(spec.budgets) * len([m for m in spec.methods if m != "dense"])
    return len(spec.contexts) * len(spec.tasks) * spec.samples * n_policies


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["context"], row["task"], row["method"], row["budget"]), []).append(row)
    out = []
    for (context, task, method, budget), group in groups.items():
        res = {"context": context, "task": task, "method": method, "budget": budget, "n": len(group),
               "top_k": group[0]["top_k"], "n_tail": group[0]["n_tail"],
               "read_fraction": float(np.mean([r["read_fraction"] for r in group]))}
        if task in QA_TASKS:
            res["score"] = 100.0 * float(np.mean([r["score"] for r in group]))
            res["planned_read_fraction"] = float(np.mean([r["planned_read_fraction"] for r in group]))
        elif task == "kl":
            for key in ("kl", "kl_max", "top1_agree", "nll"):
                res[key] = float(np.mean([r[key] for r in group]))
            res["ppl"] = math.exp(res["nll"])
        else:
            res["attn_err"] = float(np.mean([r["attn_err"] for r in group]))
            res["terciles"] = {t: _mean_or_none([r["terciles"][t] for r in group]) for t in scoring.TERCILES}
        out.append(res)
    return out


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
