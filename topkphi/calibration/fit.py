"""Fitting learned exp-linear feature maps (SPEC section 4, ``learned``) on captured q/k/v.

What is fitted is what the merge (SPEC section 5) needs, not per-pair kernel error: for each
calibration query (a decode step at position t, cache ``[0, t]``) the exact Top-K ``T`` of its
KV head is removed from the mid region, and the map must predict

- the log of the residual mid mass ``log sum_{j in mid \\ T} exp(s_j)`` and
- the residual mean value ``sum_{j in mid \\ T} p_j v_j / sum p_j``,

from the summary over ``mid \\ T`` exactly as the decode computes it (``f_q . (z - z_T)`` and
``f_q . (S - S_T)``). Each query is weighted by its true residual share of dense attention, so
queries whose unretrieved mass is negligible do not steer the fit.

Calibration queries sit on a grid of positions whose mid regions end on multiples of a stride,
so the mid summaries of all of them are one cumulative sum over blocks (no [N, m, dv] tensor).
Fitting uses torch autograd + Adam (float64, CPU is plenty); a NumPy-only or mlx-only install
cannot calibrate (``pip install "topkphi[torch]"``) but can load and use a fitted file.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from topkphi.capture import LayerCapture
from topkphi.feature_maps import FeatureMap


@dataclass(frozen=True)
class FitOptions:
    n_features: int = 32
    n_sink: int = 4
    n_tail: int = 64
    top_k: int = 64
    steps: int = 300
    lr: float = 0.02
    stride: int = 8  # calibration queries: one every ``stride`` positions
    value_weight: float = 1.0
    merge_weight: float = 0.0  # > 0 adds the merged output's relative squared error vs dense
    init_scale: float = 0.5  # W ~ init_scale * N(0, I): PRF-like directions, tempered for norm_coef = 0
    seed: int = 0
    threads: int | None = None
    # W_k = W_q (shared directions, separate biases; a learned PRF): half the parameters
    tie: bool = False
    # also fit for these budgets: the merge subtracts each query's own Top-K, so a map fitted for one
    # top_k misjudges the residual mass at another
    extra_top_k: tuple[int, ...] = ()
    # the last ``validation`` calibration sequences only score the iterates: the fit keeps the one with
    # the best validation loss (early stopping; the training loss keeps falling long after that)
    validation: int = 0
    eval_every: int = 5  # steps between validation scores
    patience: int = 0  # > 0: stop after this many validation scores without improvement
    weight_decay: float = 0.0  # pulls the parameters toward the initial map (squared distance, per parameter)
    # "lbfgs": quasi-Newton with a line search; far fewer steps than Adam for a warm-started per-prompt refit
    optimizer: str = "adam"
    # where the fit's tensors live: "cuda" puts a per-prompt fit next to a model running there
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("n_features", "steps", "stride", "top_k", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(k < 1 for k in self.extra_top_k):
            raise ValueError(f"extra_top_k must be >= 1, got {self.extra_top_k}")
        if self.validation < 0 or self.patience < 0 or self.weight_decay < 0:
            raise ValueError("validation, patience and weight_decay must be >= 0")
        if self.optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {self.optimizer!r}")
        if self.n_sink < 0 or self.n_tail < 0:
            raise ValueError("n_sink and n_tail must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def require_torch():
    try:
        import torch
    except ImportError:
        raise ValueError(
            'calibration needs torch: pip install "topkphi[torch]" (fitted files load without it)'
        ) from None
    return torch


def min_tokens(opts: FitOptions) -> int:
    """Shortest sequence that gives at least a few calibration queries."""
    return opts.n_sink + opts.n_tail + max((opts.top_k, *opts.extra_top_k)) + 8 * opts.stride


class _Sequence:
    """One sequence of one layer, with the targets of its calibration queries (torch, float64)."""

    def __init__(self, capture: LayerCapture, opts: FitOptions, torch, top_k: int | None = None):
        if top_k is not None:
            opts = replace(opts, top_k=top_k)
        k = np.asarray(capture.k[0], np.float64)  # [H, N, d]
        v = np.asarray(capture.v[0], np.float64)
        q = np.asarray(capture.q[0], np.float64)  # [Hq, L, d]
        n_heads, n_tokens, d = k.shape
        group = q.shape[0] // n_heads
        first_q = n_tokens - q.shape[1]
        s, lo = opts.stride, opts.n_sink
        n_blocks = (n_tokens - opts.n_tail - lo) // s
        # query i has a mid of i blocks: [lo, lo + i*s), at position t = lo + i*s + n_tail - 1
        counts = np.arange(1, n_blocks + 1)
        counts = counts[(counts * s >= opts.top_k + s) & (lo + counts * s + opts.n_tail - 1 >= first_q)]
        if len(counts) == 0:
            raise ValueError(
                f"a sequence of {n_tokens} tokens gives no calibration query with n_sink {opts.n_sink}, "
                f"n_tail {opts.n_tail}, top_k {opts.top_k}; it needs at least {min_tokens(opts)}"
            )
        positions = lo + counts * s + opts.n_tail - 1
        tau = capture.scale
        root = math.sqrt(tau)
        t = functools.partial(torch.as_tensor, device=opts.device)
        self.block_idx = t(counts - 1)
        mid_len = n_blocks * s
        self.n_blocks = n_blocks
        self.kt = t(root * k[:, lo : lo + mid_len], dtype=torch.float32)  # [H, M, d] keys of any mid
        self.v = t(v[:, lo : lo + mid_len], dtype=torch.float32)
        qp = q[:, positions - first_q].reshape(n_heads, group, len(positions), d)  # [H, G, P, d]
        self.qt = t(root * qp, dtype=torch.float32)

        # targets, a chunk of positions at a time ([H, G, P, N] scores of every query would not fit)
        kk, vv = t(k), t(v)
        names = ("top", "target_log_mass", "target_value", "weight", "anchor_log_mass", "anchor_value", "dense")
        parts: dict[str, list] = {name: [] for name in names}
        j = torch.arange(n_tokens, device=opts.device)
        for c0 in range(0, len(positions), 128):
            pos = t(positions[c0 : c0 + 128])
            cnt = t(counts[c0 : c0 + 128])
            scores = torch.einsum("hgpd,hnd->hgpn", t(qp[:, :, c0 : c0 + 128]), kk) * tau  # [H, G, p, N]
            causal = j[None, :] <= pos[:, None]  # [p, N]
            mid = (j[None, :] >= lo) & (j[None, :] < lo + cnt[:, None] * s)
            group_max = scores.amax(dim=1).masked_fill(~mid, -math.inf)  # [H, p, N]
            top = group_max.topk(opts.top_k, dim=-1).indices  # [H, p, K] absolute positions, all inside mid
            residual = mid[None].expand(n_heads, -1, -1).clone()
            residual.scatter_(-1, top, False)
            res_scores = scores.masked_fill(~residual[:, None], -math.inf)
            log_mass = torch.logsumexp(res_scores, dim=-1)  # [H, G, p]
            dense_scores = scores.masked_fill(~causal[None, None], -math.inf)
            total = torch.logsumexp(dense_scores, dim=-1)
            anchor_scores = scores.masked_fill(~(causal[None, None] & ~residual[:, None]), -math.inf)  # sink+tail+T
            parts["top"].append(top - lo)
            parts["target_log_mass"].append(log_mass)
            parts["target_value"].append(torch.einsum("hgpn,hnd->hgpd", torch.softmax(res_scores, dim=-1), vv))
            parts["weight"].append(torch.exp(log_mass - total))  # residual share of dense attention
            parts["anchor_log_mass"].append(torch.logsumexp(anchor_scores, dim=-1))
            parts["anchor_value"].append(torch.einsum("hgpn,hnd->hgpd", torch.softmax(anchor_scores, dim=-1), vv))
            parts["dense"].append(torch.einsum("hgpn,hnd->hgpd", torch.softmax(dense_scores, dim=-1), vv))
        for name in names:
            setattr(self, name, torch.cat(parts[name], dim=1 if name == "top" else 2))
        # residual = mid \\ T of each query, as a mask over the keys of the longest mid: [H, 1, P, M]
        in_mid = torch.arange(mid_len, device=opts.device)[None, :] < t(counts * s)[:, None]
        residual = in_mid[None].expand(n_heads, -1, -1).clone()
        residual.scatter_(-1, self.top, False)
        self.residual = residual[:, None].to(torch.float32)
        centered = v - v.mean(axis=1, keepdims=True)
        self.value_scale = t((centered**2).sum(-1).mean(-1))[:, None, None]  # [H, 1, 1]
        self.n_queries = int(np.prod(self.weight.shape))

    def predict(self, w_q, b_q, w_k, b_k, torch):
        """``(log mass [H,G,P], mean value [H,G,P,dv])`` of ``mid \\ T`` from the maps.

        The estimate ``sum_{j in mid \\ T} phi_q(q) . phi_k(k_j) [1, v_j]`` equals the decode's
        ``f_q . (z - z_T)`` (and ``S - S_T``) without the cancellation, so float32 is safe here."""
        dtype = self.kt.dtype
        lk = torch.einsum("hnd,hmd->hnm", self.kt, w_k.to(dtype)) + b_k.to(dtype)[:, None]  # [H, M, m]
        c_k = lk.detach().amax(dim=(1, 2), keepdim=True)
        e_k = torch.exp(lk - c_k)
        lq = torch.einsum("hgpd,hmd->hgpm", self.qt, w_q.to(dtype)) + b_q.to(dtype)[:, None, None]
        c_q = lq.detach().amax(dim=-1, keepdim=True)
        f_q = torch.exp(lq - c_q)
        n_heads, group, n_pos, m = f_q.shape
        kernel = torch.bmm(f_q.reshape(n_heads, group * n_pos, m), e_k.transpose(1, 2))  # [H, G*P, M]
        kernel = kernel.reshape(n_heads, group, n_pos, -1) * self.residual  # residual: [H, 1, P, M]
        den = kernel.sum(-1)
        num = torch.bmm(kernel.reshape(n_heads, group * n_pos, -1), self.v).reshape(n_heads, group, n_pos, -1)
        den_safe = den.clamp_min(1e-30)
        log_mass = c_q[..., 0].double() + c_k[:, :, :1].double() + torch.log(den_safe).double()
        return log_mass, (num / den_safe[..., None]).double()

    def loss(self, params, value_weight: float, torch, merge_weight: float = 0.0):
        log_mass, value = self.predict(*params, torch)
        mass_err = (log_mass - self.target_log_mass) ** 2
        value_err = ((value - self.target_value) ** 2).sum(-1) / self.value_scale
        per_query = mass_err + value_weight * value_err
        moments = (self.weight * per_query).sum() / self.weight.sum()
        if merge_weight == 0:
            return moments, log_mass
        # the merge itself (SPEC section 5): exact anchors + the estimate, against dense attention
        share = torch.sigmoid(log_mass - self.anchor_log_mass)[..., None]
        out = (1 - share) * self.anchor_value + share * value
        merge = (((out - self.dense) ** 2).sum(-1) / (self.dense**2).sum(-1)).mean()
        return moments + merge_weight * merge, log_mass


@dataclass
class LayerFit:
    layer: int
    fmap: FeatureMap
    loss_before: float
    loss_after: float
    steps: int
    seconds: float
    val_before: float | None = None  # validation loss of the initial and of the kept map
    val_after: float | None = None
    best_step: int | None = None  # the step whose parameters were kept


def init_params(n_heads: int, d: int, opts: FitOptions, layer: int = 0, init: FeatureMap | None = None):
    """``(w_q, b_q, w_k, b_k)`` as float64 arrays: a warm start, or PRF-like random directions."""
    if init is not None:
        if init.kind != "learned" or init.d != d or init.n_features != opts.n_features:
            raise ValueError(
                f"the warm-start map (kind {init.kind}, d {init.d}, m {init.n_features}) does not fit "
                f"d {d}, m {opts.n_features}"
            )
        arrays = [np.asarray(a, np.float64) for a in (init.w_q, init.b_q, init.w_k, init.b_k)]
        if arrays[0].shape[0] == 1 and n_heads > 1:
            arrays = [np.repeat(a, n_heads, axis=0) for a in arrays]
        return arrays
    rng = np.random.default_rng([opts.seed, layer])
    omega = opts.init_scale * rng.standard_normal((n_heads, opts.n_features, d))
    bias = np.full((n_heads, opts.n_features), -0.5 * math.log(opts.n_features))
    return [omega, bias, omega.copy(), bias.copy()]


def _sequences(captures: Sequence[LayerCapture], opts: FitOptions, torch) -> list[_Sequence]:
    return [_Sequence(c, opts, torch, k) for c in captures for k in (opts.top_k, *opts.extra_top_k)]


def fit_layer(
    captures: Sequence[LayerCapture],
    opts: FitOptions,
    layer: int = 0,
    init: FeatureMap | None = None,
    on_step: Callable[[int, float], None] | None = None,
    deadline: float | None = None,
) -> LayerFit:
    """Fit one layer's maps (all its KV heads at once) on the captures of one or more sequences.

    With ``opts.validation`` the last captures only score the iterates, and the best-scoring one is
    kept; otherwise the iterate with the lowest training loss."""
    torch = require_torch()
    start = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    n_val = opts.validation
    if n_val and len(captures) <= n_val:
        raise ValueError(f"validation {n_val} needs more than {n_val} calibration sequences, got {len(captures)}")
    with torch.enable_grad():
        data = _sequences(captures[: len(captures) - n_val], opts, torch)
        val = _sequences(captures[len(captures) - n_val :], opts, torch) if n_val else []
        n_heads, _, d = data[0].kt.shape
        arrays = init_params(n_heads, d, opts, layer, init)
        if opts.tie:
            arrays[2] = arrays[0]
        param = functools.partial(torch.tensor, dtype=torch.float64, device=opts.device, requires_grad=True)
        t = [param(a) for a in arrays[:2]]
        b_k = param(arrays[3])
        w_k = t[0] if opts.tie else param(arrays[2])
        params = [t[0], t[1], w_k, b_k]  # what predict() takes; w_k is w_q itself when tied
        leaves = [t[0], t[1], b_k] if opts.tie else params
        if init is None:  # centre the log mass: a shift of b_q moves every prediction by the same amount
            with torch.no_grad():
                gap = [
                    ((s.target_log_mass - s.predict(*params, torch)[0]) * s.weight).sum((1, 2)) / s.weight.sum((1, 2))
                    for s in data
                ]
                params[1] += torch.stack(gap).mean(0)[:, None]
        anchor = [p.detach().clone() for p in leaves]
        n_params = sum(p.numel() for p in leaves)

        def data_loss(seqs):
            return sum(s.loss(params, opts.value_weight, torch, opts.merge_weight)[0] for s in seqs) / len(seqs)

        def total_loss():
            loss = data_loss(data)
            if opts.weight_decay:  # toward the initial map, not toward 0: exp-linear maps need their biases
                loss = loss + opts.weight_decay * sum(((p - a) ** 2).sum() for p, a in zip(leaves, anchor)) / n_params
            return loss

        def score():
            with torch.no_grad():
                return float(data_loss(val)) if val else float(total_loss())

        if opts.optimizer == "lbfgs":
            optimizer = torch.optim.LBFGS(leaves, lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
        else:
            optimizer = torch.optim.Adam(leaves, lr=opts.lr)

        def closure():
            optimizer.zero_grad()
            loss = total_loss()
            loss.backward()
            return loss

        with torch.no_grad():
            before = float(total_loss())
        val_before = score() if val else None
        best = val_before if val else before
        best_params, best_step, steps, since_best = [p.detach().clone() for p in params], 0, 0, 0
        for step in range(opts.steps):
            if deadline is not None and time.perf_counter() > deadline:
                break
            current_params = [p.detach().clone() for p in params]
            loss = optimizer.step(closure)  # the loss of ``current_params``, before the step
            if not torch.isfinite(loss):
                break
            steps = step + 1
            if on_step is not None:
                on_step(steps, float(loss.detach()))
            if not val:  # no extra pass: the step's own loss scores the iterate it started from
                if float(loss.detach()) < best:
                    best, best_params, best_step = float(loss.detach()), current_params, step
                continue
            if steps % opts.eval_every and steps != opts.steps:
                continue
            current = score()
            if math.isfinite(current) and current < best:
                best, best_params, best_step, since_best = current, [p.detach().clone() for p in params], steps, 0
            else:
                since_best += 1
                if opts.patience and since_best >= opts.patience:
                    break
        if not val and steps:  # the last iterate has not been scored yet
            last = score()
            if math.isfinite(last) and last < best:
                best, best_params, best_step = last, [p.detach().clone() for p in params], steps
        with torch.no_grad():
            for p, b in zip(params, best_params):
                p.copy_(b)
            after = float(total_loss())
    arrays = [p.cpu().numpy() for p in best_params]
    return LayerFit(
        layer,
        FeatureMap.learned(*arrays),
        before,
        after,
        steps,
        time.perf_counter() - start,
        val_before,
        best if val else None,
        best_step,
    )


def fit_model(
    layers_by_sequence: Sequence[Sequence[LayerCapture]],
    opts: FitOptions,
    init_maps: Sequence[FeatureMap] | None = None,
    on_layer_start: Callable[[int], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    on_layer_done: Callable[[LayerFit], None] | None = None,
    time_budget_s: float | None = None,
) -> list[LayerFit]:
    """Fit every layer. ``layers_by_sequence[s][l]`` is sequence s's capture of layer l.

    With ``time_budget_s`` the budget is split evenly over the layers (per-prompt refinement)."""
    n_layers = len(layers_by_sequence[0])
    if any(len(seq) != n_layers for seq in layers_by_sequence):
        raise ValueError("every sequence must capture the same layers")
    if init_maps is not None and len(init_maps) != n_layers:
        raise ValueError(f"the warm start has {len(init_maps)} layers, the model has {n_layers}")
    fits = []
    start = time.perf_counter()
    for layer in range(n_layers):
        deadline = None
        if time_budget_s is not None:
            deadline = start + time_budget_s * (layer + 1) / n_layers
        if on_layer_start is not None:
            on_layer_start(layer)
        step_cb = None if on_step is None else (lambda step, loss, _l=layer: on_step(_l, step, loss))
        fit = fit_layer(
            [seq[layer] for seq in layers_by_sequence],
            opts,
            layer,
            None if init_maps is None else init_maps[layer],
            step_cb,
            deadline,
        )
        fits.append(fit)
        if on_layer_done is not None:
            on_layer_done(fit)
    return fits
