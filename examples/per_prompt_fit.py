"""Per-prompt learned phi on held-out text, layer by layer: error vs dense of Top-K + phi and of Top-K only at
matched reads (float64 oracle replays of the text's last decode steps).

    python examples/per_prompt_fit.py --layers 3,15,27 --m 16 --merge-weight 100 --steps 300
    python examples/per_prompt_fit.py --eval grid:4 --fit-on-scored   # scoring positions the fit saw

The fit sees the prompt only (every position before the first scored one) unless ``--fit-on-scored``:
then it sees the whole text, and with ``--eval grid:P`` the scored positions are calibration queries
themselves, which is how a per-prompt number can look better than it is. Needs torch; CPU is enough.
"""

from __future__ import annotations

import argparse
import math
import sys

from rich.console import Console
from rich.table import Table

from topkphi.calibration.data import token_sequences
from topkphi.calibration.fit import FitOptions, fit_layer
from topkphi.calibration.replay import replay_errors, split_validation, truncate
from topkphi.capture import capture_ids
from topkphi.commands.calibrate import calibration_texts, load_model
from topkphi.reads import summary_reads


def scored_positions(spec: str, n_tokens: int, opts: FitOptions) -> list[int]:
    """``last:P``: the last P positions; ``grid:P``: the last P positions of the fit's query grid."""
    mode, count = spec.split(":")
    count = int(count)
    if mode == "last":
        return list(range(n_tokens - count, n_tokens))
    last = opts.n_sink + ((n_tokens - opts.n_sink - opts.n_tail) // opts.stride) * opts.stride + opts.n_tail - 1
    return sorted(last - opts.stride * i for i in range(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", default="3,15,27", help="comma-separated, or 'all'")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--merge-weight", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--eval", default="last:4", help="last:P or grid:P (see the module docstring)")
    parser.add_argument("--fit-on-scored", action="store_true", help="fit on the whole text, scored positions too")
    parser.add_argument("--val-queries", type=int, default=0,
                        help="hold out the prompt's last V positions' queries: keep the iterate they score best")
    args = parser.parse_args()
    console = Console()
    net, tokenizer, runtime = load_model(args.model, "cpu")
    text_name, text = next(iter(calibration_texts((), True, "held-out").items()))
    ids = token_sequences(tokenizer, {text_name: text}, args.tokens, 1)[0]
    with console.status(f"capturing {len(ids)} tokens of {text_name}"):
        layers = capture_ids(net, ids, runtime.framework)
    opts = FitOptions(n_features=args.m, n_sink=4, n_tail=64, top_k=args.top_k, steps=args.steps, lr=args.lr,
                      stride=args.stride, merge_weight=args.merge_weight, validation=1 if args.val_queries else 0)
    positions = scored_positions(args.eval, len(ids), opts)
    chosen = range(len(layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    table = Table(title=f"{args.model}, {text_name}, N={len(ids)}, scored {positions[0]}..{positions[-1]}, "
                  f"fit on {'the whole text' if args.fit_on_scored else 'the prompt only'}")
    for col in ("layer", "steps", "fit s", "K matched", "err Top-K", "err Top-K+phi", "ratio"):
        table.add_column(col, justify="right")
    sums = [0.0, 0.0]
    for layer in chosen:
        capture = layers[layer]
        seen = [capture if args.fit_on_scored else truncate(capture, positions[0])]
        if args.val_queries:
            seen = split_validation(seen[0], args.val_queries)
        with console.status(f"fitting layer {layer}"):
            fit = fit_layer(seen, opts, layer)
        d = capture.k.shape[-1]
        matched = args.top_k + math.ceil(summary_reads(fit.fmap, d, capture.v.shape[-1]))  # SPEC section 6
        err_top = float(replay_errors([capture], positions, 4, 64, matched, None).mean())
        err_phi = float(replay_errors([capture], positions, 4, 64, args.top_k, [fit.fmap]).mean())
        sums[0] += err_top
        sums[1] += err_phi
        table.add_row(str(layer), str(fit.steps), f"{fit.seconds:.1f}", str(matched), f"{err_top:.4f}",
                      f"{err_phi:.4f}", f"{err_top / err_phi:.2f}x")
    table.add_row("mean", "", "", "", f"{sums[0] / len(chosen):.4f}", f"{sums[1] / len(chosen):.4f}",
                  f"{sums[0] / sums[1]:.2f}x")
    console.print(table)
    console.print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
