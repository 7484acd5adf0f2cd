"""One sample under every policy: question tasks (greedy answers), teacher-forced KL, attention error.

The prompt is prefilled once, densely (every method prefills the same way), without its last token;
each method then gets a copy of that KV cache and decodes the last prompt token and the answer one
step at a time, so every answer token, the first included, comes from the method's decode steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from topkphi.backends.numpy_backend import NumpyBackend
from topkphi.evaluation import scoring
from topkphi.evaluation.runners import FIT_WINDOW, Runner, Session
from topkphi.evaluation.tasks import Sample

_ORACLE = NumpyBackend()


def greedy(session: Session, first_logits: np.ndarray, max_tokens: int, eos: set[int],
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


def run_qa(runner: Runner, spec, sample: Sample, tick) -> list[dict]:
    """One prompt: a shared dense prefill, then each policy's greedy answer."""
    prompt = runner.encode(sample.prompt)
    snapshot = runner.prefill(prompt[:-1])
    rows = []
    for pol in spec.policies(len(prompt), runner.d, runner.dv):
        session = runner.session(snapshot, pol)
        first = session.step(prompt[-1])
        text = runner.decode(greedy(session, first, sample.max_tokens, runner.eos, runner.decode))
        rows.append({"method": pol.method, "budget": pol.budget,
                     "score": scoring.score(sample.metric, text, sample.answers), "prediction": text,
                     "read_fraction": session.read_fraction(),
                     "planned_read_fraction": pol.planned_reads / len(prompt), **pol.knobs()})
        tick()
    return rows


def run_kl(runner: Runner, spec, sample: Sample, tick) -> list[dict]:
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
                     **pol.knobs()})
        tick()
    return rows


def run_attn(runner: Runner, spec, sample: Sample, tick) -> list[dict]:
    """Per-head relative attention-output error vs dense on the captured q/k/v (float64 oracle), split by
    the dense attention's normalized-entropy tercile."""
    from topkphi.analysis.heads import attention_probs, normalized_entropy, relative_error

    ids = sample.ids
    captures = runner.capture(ids, spec.attn_positions + FIT_WINDOW)  # + the rows fitted summaries fit from
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
                decoder = pol.decode_backend(_ORACLE)
                # fitted summaries fit from the rows before the scored position only (SPEC 8)
                queries = cap.reference_queries(position, cfg.fit_window) if cfg.fitted else None
                summary = decoder.build_summary(k, v, cfg, queries=queries)
                out, stats = decoder.decode(q, k, v, summary, cfg)
                errors[pol.label].append(relative_error(np.asarray(out)[0], ref[0]))
                reads[pol.label].append(float(np.mean(stats.token_equivalents)) / (position + 1))
    ent = np.concatenate(entropy)
    split = scoring.entropy_terciles(ent, {label: np.concatenate(e) for label, e in errors.items()})
    rows = [{"method": "dense", "budget": None, "attn_err": 0.0, "terciles": {t: 0.0 for t in scoring.TERCILES},
             "read_fraction": 1.0, **policies[0].knobs()}]
    tick()
    for pol in policies[1:]:
        row = split[pol.label]
        rows.append({"method": pol.method, "budget": pol.budget, "attn_err": row["all"],
                     "terciles": {t: row[t] for t in scoring.TERCILES}, "tercile_edges": split["edges"],
                     "read_fraction": float(np.mean(reads[pol.label])), **pol.knobs()})
        tick()
    return rows


RUNS = {"kl": run_kl, "attn": run_attn}  # every other task is a question: run_qa


def run_sample(runner: Runner, spec, sample: Sample, tick) -> list[dict]:
    return RUNS.get(sample.task, run_qa)(runner, spec, sample, tick)
