"""Methods x budgets x tasks at matched token-equivalent reads per decode step (SPEC section 6).

Every method reads the same token-equivalents per KV head per decode step at a budget ``B``:

- ``topk+phi``: sink + tail + Top-K (``top_k = B``) exact, plus the summary, plus selection reads;
- ``topk``: the same with no summary, its share given back as retrieved tokens (``matched_top_k``);
- ``sink-tail`` (StreamingLLM-style): no retrieval, no selection; sink + a longer tail holding all of
  topk+phi's reads (exact + summary + selection, at the sample's length). ``Config`` needs
  ``top_k >= 1``, so sink-tail runs through a wrapper backend (``SinkTailBackend``) whose decode is
  exact attention over the sink and the tail only, and whose reads are exactly ``n_sink + n_tail``;
- ``dense``: the whole cache, always run (the model's own ceiling).

With learned maps (``EvalSpec.maps``: one calibrated ``FeatureMap`` per layer, from a phi file) topk+phi's
summary share includes each map's query-side parameters (SPEC section 6), so ``topk`` and ``sink-tail`` get
correspondingly more; every layer gets its own map, and the matched reads are computed per layer.

The prompt is prefilled once, densely (every method prefills the same way), without its last token;
each method then gets a copy of that KV cache and decodes the last prompt token and the answer one
step at a time, so every answer token, the first included, comes from the method's decode steps.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from topkphi.backends.base import DecodeStats
from topkphi.backends.numpy_backend import NumpyBackend
from topkphi.config import Config
from topkphi.evaluation import scoring
from topkphi.evaluation.tasks import QA_TASKS, TASKS, Sample, generate
from topkphi.reads import matched_top_k, selection_reads, summary_reads

METHODS = ("dense", "sink-tail", "topk", "topk+phi")
_ORACLE = NumpyBackend()


# ---------------------------------------------------------------- policies at matched reads


@dataclass(frozen=True)
class Policy:
    method: str
    budget: int | None  # None for dense
    cfg: Config | None  # None for dense; layer 0's config when the layers differ
    planned_reads: float  # token-equivalents per KV head per decode step at the sample's length (layer mean)
    layer_cfgs: tuple[Config, ...] | None = None  # one per layer (learned maps); None: ``cfg`` everywhere

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget}"

    def config(self, layer: int) -> Config | None:
        return self.cfg if self.layer_cfgs is None else self.layer_cfgs[layer]

    @property
    def engine_cfg(self):
        """What the generation engines take: one ``Config`` (or None: dense) or ``layer_idx -> Config``."""
        return self.cfg if self.layer_cfgs is None else self.config


def policy(method: str, budget: int | None, base: Config, n_tokens: int, d: int, dv: int,
           maps: list | None = None) -> Policy:
    """``method`` at budget ``budget`` for a context of ``n_tokens``, matched to topk+phi's reads.

    ``maps``: one learned ``FeatureMap`` per layer; each layer's topk+phi uses its map, and the other methods
    are matched to that layer's reads (its summary includes the map's query-side parameters)."""
    if maps is None or method == "dense":
        return _policy(method, budget, base, n_tokens, d, dv)
    per_layer = [_policy(method, budget, base.replace(feature_map=fmap, n_features=fmap.n_features), n_tokens, d, dv)
                 for fmap in maps]
    cfgs = tuple(p.cfg for p in per_layer)
    planned = float(np.mean([p.planned_reads for p in per_layer]))
    if method != "topk+phi" and all(c == cfgs[0] for c in cfgs):  # no map in them: one config serves every layer
        return Policy(method, budget, cfgs[0], planned)
    return Policy(method, budget, cfgs[0], planned, cfgs)


def _policy(method: str, budget: int | None, base: Config, n_tokens: int, d: int, dv: int) -> Policy:
    if method == "dense":
        return Policy("dense", None, None, float(n_tokens))
    phi = base.replace(top_k=budget)
    n_mid = max(0, n_tokens - base.n_sink - base.n_tail)
    fmap = phi.feature_map_for(d)
    total = base.n_sink + base.n_tail + min(budget, n_mid) + summary_reads(fmap, d, dv)
    total += selection_reads(phi, n_mid, d, dv)
    if method == "topk+phi":
        return Policy(method, budget, phi, total)
    if method == "topk":
        return Policy(method, budget, phi.replace(feature_map=None, top_k=matched_top_k(phi, d, dv)), total)
    if method == "sink-tail":
        n_tail = max(base.n_tail, math.ceil(total) - base.n_sink)
        cfg = base.replace(feature_map=None, top_k=1, n_tail=n_tail)
        return Policy(method, budget, cfg, float(base.n_sink + n_tail))
    raise ValueError(f"unknown method {method!r}; expected some of {', '.join(METHODS)}")


class SinkTailBackend:
    """StreamingLLM-style decode through the topkphi cache: exact attention over sink + tail only.

    Wraps the runtime's kernel backend (torch or mlx) for its dense attention; keeps no summary.
    """

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, f"sink-tail({inner.name})"

    def build_summary(self, k, v, cfg: Config):
        return None

    def append(self, summary, k, v, cfg: Config):
        return None

    def dense(self, q, k, v, scale=None):
        return self.inner.dense(q, k, v, scale)

    def decode(self, q, k, v, summary, cfg: Config):
        n = k.shape[2]
        batch, n_q, n_kv = q.shape[0], q.shape[1], k.shape[1]
        if n > cfg.n_sink + cfg.n_tail:
            k, v = (_cat([x[:, :, : cfg.n_sink], x[:, :, n - cfg.n_tail :]]) for x in (k, v))
        out = self.inner.dense(q, k, v, cfg.tau(q.shape[-1]))
        read = float(k.shape[2])
        stats = DecodeStats(rho=_full(q, (batch, n_q), 0.0), selected=_full(q, (batch, n_kv, 0), 0),
                            n_selected=_full(q, (batch, n_kv), 0), tokens_read=_full(q, (batch, n_kv), read),
                            token_equivalents=_full(q, (batch, n_kv), read), n_tokens=n)
        return out, stats


def _cat(parts):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=2)
    if type(parts[0]).__module__.startswith("torch"):
        import torch

        return torch.cat(parts, dim=2)
    import mlx.core as mx

    return mx.concatenate(parts, axis=2)


def _full(like, shape, value):
    if isinstance(like, np.ndarray):
        return np.full(shape, value, dtype=np.float64)
    if type(like).__module__.startswith("torch"):
        import torch

        return torch.full(shape, value, dtype=torch.float32, device=like.device)
    import mlx.core as mx

    return mx.full(shape, value, dtype=mx.float32)


# ---------------------------------------------------------------- runners (torch and mlx)


class TorchRunner:
    """An HF model: a dense prefill to share, then one cache per method, stepped one token at a time."""

    framework = "torch"

    def __init__(self, model, tokenizer, kernel) -> None:
        from topkphi.generation.torch_engine import _eos_ids

        self.model, self.tokenizer, self.kernel = model, tokenizer, kernel
        self.eos = _eos_ids(model, tokenizer)
        cfg = model.config
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dv = self.d

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def prefill(self, ids: list[int]):
        import torch
        from transformers import DynamicCache

        from topkphi.integrations.hf import cache_kwargs

        cache = DynamicCache(config=self.model.config)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([ids], device=device), **cache_kwargs(self.model, cache), use_cache=True)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def session(self, snapshot, pol: Policy) -> Session:
        import torch

        from topkphi.generation.torch_engine import TorchEngine

        backend = SinkTailBackend(self.kernel) if pol.method == "sink-tail" else self.kernel
        engine = TorchEngine(self.model, self.tokenizer, pol.engine_cfg, None if pol.cfg is None else backend)
        engine.cache = engine._new_cache()
        with torch.inference_mode():
            for i, (k, v) in enumerate(snapshot):
                engine.cache.update(k, v, i)

        def step(token: int) -> np.ndarray:
            with torch.inference_mode(), engine.routing():
                return engine._forward([token]).float().cpu().numpy()

        def read_fraction() -> float:
            return 1.0 if pol.cfg is None else engine.cache.totals.means()[1]

        return Session(step, read_fraction)

    def capture(self, ids: list[int], n_queries: int):
        import torch

        from topkphi.capture import capture_torch

        device = next(self.model.parameters()).device
        return capture_torch(self.model, torch.tensor([ids], device=device), n_queries)


class MLXRunner:
    framework = "mlx"

    def __init__(self, model, tokenizer, kernel) -> None:
        self.model, self.tokenizer, self.kernel = model, tokenizer, kernel
        ids = getattr(tokenizer, "eos_token_ids", None) or [getattr(tokenizer, "eos_token_id", None)]
        self.eos = {i for i in ids if i is not None}
        args = getattr(model, "args", None)
        d = getattr(args, "head_dim", None) if args is not None else None
        if d is None and args is not None:
            d = args.hidden_size // args.num_attention_heads
        self.d = self.dv = d

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def prefill(self, ids: list[int]):
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        mx.eval(self.model(mx.array([ids]), cache=cache))
        return [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in cache]

    def session(self, snapshot, pol: Policy) -> Session:
        import mlx.core as mx

        from topkphi.generation.mlx_engine import MLXEngine
        from topkphi.integrations.mlx_lm import cache_totals

        backend = SinkTailBackend(self.kernel) if pol.method == "sink-tail" else self.kernel
        engine = MLXEngine(self.model, self.tokenizer, pol.engine_cfg, None if pol.cfg is None else backend)
        engine.cache = engine._new_cache()
        for c, (k, v) in zip(engine.cache, snapshot):
            c.update_and_fetch(k, v)

        def step(token: int) -> np.ndarray:
            with engine.routing():
                logits = self.model(mx.array([[token]]), cache=engine.cache)[0, -1]
            return np.array(logits.astype(mx.float32))

        def read_fraction() -> float:
            return 1.0 if pol.cfg is None else cache_totals(engine.cache)[1]

        return Session(step, read_fraction)

    def capture(self, ids: list[int], n_queries: int):
        import mlx.core as mx

        from topkphi.capture import capture_mlx

        return capture_mlx(self.model, mx.array([ids]), n_queries)


@dataclass
class Session:
    step: Callable[[int], np.ndarray]  # feed one token, get the next-token logits [vocab]
    read_fraction: Callable[[], float]  # mean over decode steps so far, every layer


def make_runner(framework: str, model, tokenizer, kernel):
    return (TorchRunner if framework == "torch" else MLXRunner)(model, tokenizer, kernel)


# ---------------------------------------------------------------- the evaluation


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

    def policies(self, n_tokens: int, d: int, dv: int) -> list[Policy]:
        """Dense first (always: the reference), then every other method at every budget."""
        out = [policy("dense", None, self.base, n_tokens, d, dv)]
        for budget in self.budgets:
            out += [policy(m, budget, self.base, n_tokens, d, dv, self.maps) for m in self.methods if m != "dense"]
        return out


def greedy(session: Session, prompt: list[int], first_logits: np.ndarray, max_tokens: int, eos: set[int],
           decode: Callable[[list[int]], str]) -> list[int]:
    """Greedy tokens; stops at EOS, ``max_tokens``, or a newline once the answer has started."""
    logits, out = first_logits, []
    for i in range(max_tokens):
        token = int(np.argmax(logits))
        if token in eos:
            break
        out.append(token)
        text = decode(out)
        if "\n" in text.lstrip():
            break
        if i + 1 < max_tokens:
            logits = session.step(token)
    return out


def _decode_fn(tokenizer) -> Callable[[list[int]], str]:
    def decode(ids: list[int]) -> str:
        try:
            return tokenizer.decode(ids, skip_special_tokens=True)
        except TypeError:
            return tokenizer.decode(ids)

    return decode


def run_qa(runner, spec: EvalSpec, sample: Sample, tick) -> list[dict]:
    """One prompt: a shared dense prefill, then each policy's greedy answer."""
    prompt = runner.encode(sample.prompt)
    snapshot = runner.prefill(prompt[:-1])
    decode = _decode_fn(runner.tokenizer)
    rows = []
    for pol in spec.policies(len(prompt), runner.d, runner.dv):
        session = runner.session(snapshot, pol)
        first = session.step(prompt[-1])
        answer = greedy(session, prompt, first, sample.max_tokens, runner.eos, decode)
        text = decode(answer)
        rows.append({"method": pol.method, "budget": pol.budget, "score": scoring.score(sample.metric, text,
                                                                                       sample.answers),
                     "prediction": text, "read_fraction": session.read_fraction(),
                     "planned_read_fraction": pol.planned_reads / len(prompt), **_knobs(pol)})
        tick()
    return rows


def run_kl(runner, spec: EvalSpec, sample: Sample, tick) -> list[dict]:
    """Teacher-forced: dense prefill of the window's prefix, then the last ``kl_tokens`` tokens decoded one
    at a time by every policy; KL(dense || method) of each step's next-token distribution, and perplexity."""
    ids = sample.ids
    n_eval = min(spec.kl_tokens, len(ids) // 4)
    start = len(ids) - n_eval  # first predicted token
    snapshot = runner.prefill(ids[: start - 1])
    targets = np.asarray(ids[start:])
    ref = None
    rows = []
    for pol in spec.policies(len(ids), runner.d, runner.dv):
        session = runner.session(snapshot, pol)
        logits = np.stack([session.step(t) for t in ids[start - 1 : len(ids) - 1]])
        if ref is None:
            ref = logits  # dense comes first
        kl = scoring.kl_divergence(ref, logits)
        nll = scoring.token_nll(logits, targets)
        rows.append({"method": pol.method, "budget": pol.budget, "kl": float(kl.mean()), "kl_max": float(kl.max()),
                     "nll": float(nll.mean()), "ppl": scoring.perplexity(nll),
                     "top1_agree": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
                     "read_fraction": session.read_fraction(), "planned_read_fraction": pol.planned_reads / len(ids),
                     **_knobs(pol)})
        tick()
    return rows


def run_attn(runner, spec: EvalSpec, sample: Sample, tick) -> list[dict]:
    """Per-head relative attention-output error vs dense on the captured q/k/v (float64 oracle), split by
    the dense attention's normalized-entropy tercile."""
    from topkphi.analysis.heads import attention_probs, normalized_entropy, relative_error

    ids = sample.ids
    captures = runner.capture(ids, spec.attn_positions)
    n = len(ids)
    policies = spec.policies(n, runner.d, runner.dv)
    entropy: list[np.ndarray] = []
    errors: dict[str, list[np.ndarray]] = {p.label: [] for p in policies[1:]}
    reads: dict[str, list[float]] = {p.label: [] for p in policies[1:]}
    for layer, cap in enumerate(captures):
        for position in range(n - spec.attn_positions, n):
            q, k, v = (np.asarray(x, np.float64) for x in cap.decode_step(position))
            ref = _ORACLE.dense(q, k, v, cap.scale)
            entropy.append(normalized_entropy(attention_probs(q[0], k[0], cap.scale)))
            for pol in spec.policies(position + 1, runner.d, runner.dv)[1:]:
                cfg = pol.config(layer).replace(scale=cap.scale)
                if pol.method == "sink-tail":
                    out = SinkTailBackend(_ORACLE).decode(q, k, v, None, cfg)[0]
                    te = pol.planned_reads
                else:
                    out, stats = _ORACLE.decode(q, k, v, _ORACLE.build_summary(k, v, cfg), cfg)
                    te = float(np.mean(stats.token_equivalents))
                errors[pol.label].append(relative_error(np.asarray(out)[0], ref[0]))
                reads[pol.label].append(te / (position + 1))
    ent = np.concatenate(entropy)
    split = scoring.entropy_terciles(ent, {label: np.concatenate(e) for label, e in errors.items()})
    rows = [{"method": "dense", "budget": None, "attn_err": 0.0, "terciles": {t: 0.0 for t in scoring.TERCILES},
             "read_fraction": 1.0, **_knobs(policies[0])}]
    tick()
    for pol in policies[1:]:
        row = split[pol.label]
        rows.append({"method": pol.method, "budget": pol.budget, "attn_err": row["all"],
                     "terciles": {t: row[t] for t in scoring.TERCILES}, "tercile_edges": split["edges"],
                     "read_fraction": float(np.mean(reads[pol.label])), **_knobs(pol)})
        tick()
    return rows


def _knobs(pol: Policy) -> dict:
    if pol.cfg is None:
        return {"top_k": None, "n_tail": None}
    return {"top_k": None if pol.method == "sink-tail" else pol.cfg.top_k, "n_tail": pol.cfg.n_tail}


RUNNERS = {"kl": run_kl, "attn": run_attn}


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

                run = RUNNERS.get(task, run_qa)
                for row in run(runner, spec, sample, tick):
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
