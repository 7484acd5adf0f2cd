"""The flags the model commands share, with one set of defaults: ``topkphi.Config()``'s own.

The choices of ``--selection`` and ``--feature-map`` are read from ``topkphi.config`` (``SELECTIONS``,
``ESTIMATORS``), so a selection or an estimator added there appears here without an edit. Importing
this module imports no framework: ``--help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import click

from topkphi.config import BUDGETS, DEFAULT_ESTIMATOR, ESTIMATORS, SELECTIONS, Config
from topkphi.models.resolve import DEFAULT_MODEL

DEFAULTS = Config()
# `--backend` takes the names `topkphi backends` lists; model commands cannot run the numpy oracle
MODEL_BACKENDS = ("auto", "torch", "triton", "mlx")
KV_BACKENDS = ("auto", "numpy", "torch", "triton", "mlx")
# old runtime names, still accepted (with a note) so recorded commands keep working
LEGACY_BACKENDS = {"cpu": "torch on the CPU", "cuda": "torch on the GPU, Triton kernels where installed"}
BACKEND_HELP = ("auto: torch on a CUDA GPU (Triton kernels where installed), else MLX on Metal, else torch on the "
                "CPU, else MLX on the CPU; torch: torch (CUDA where present, else CPU); triton: torch on a CUDA GPU "
                "with the fused Triton kernels; mlx: mlx-lm (Metal or CPU).")


class BackendChoice(click.Choice):
    """``click.Choice`` of backend names that also takes the legacy names, saying what they became."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value in LEGACY_BACKENDS:
            click.echo(f"note: --backend {value} is an old name; it means {LEGACY_BACKENDS[value]} "
                       f"(--backend {'torch' if value == 'cpu' else 'triton'} in today's names)", err=True)
            return value
        return super().convert(value, param, ctx)


def model_option(fn):
    return click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                        help="Alias, local HF folder, .gguf file or hub id.")(fn)


def backend_option(fn=None, *, names=MODEL_BACKENDS, default="auto", help=BACKEND_HELP):
    if fn is None:
        return lambda f: backend_option(f, names=names, default=default, help=help)
    return click.option("--backend", type=BackendChoice(names), default=default, show_default=True, help=help)(fn)


def estimator_names(per_prompt: bool = False) -> list[str]:
    """``--feature-map`` choices: every estimator of ``topkphi.config``, ``none`` (Top-K only), and for chat
    ``learned-prompt`` (maps fitted on each new prompt)."""
    names = list(ESTIMATORS)
    if per_prompt and "learned" in names:
        names.insert(names.index("learned") + 1, "learned-prompt")
    return [DEFAULT_ESTIMATOR, *names, "none"]


def budget_options(fn=None, *, top_k: bool = True, top_k_help: str = "Retrieved mid tokens per KV head."):
    """``--n-sink --n-tail [--top-k] --selection --page-size``, defaults from ``topkphi.Config()``."""
    if fn is None:
        return lambda f: budget_options(f, top_k=top_k, top_k_help=top_k_help)
    options = [
        click.option("--n-sink", type=int, default=DEFAULTS.n_sink, show_default=True,
                     help="First tokens always read exactly."),
        click.option("--n-tail", type=int, default=DEFAULTS.n_tail, show_default=True,
                     help="Last tokens always read exactly."),
        *([click.option("--top-k", type=int, default=DEFAULTS.top_k, show_default=True, help=top_k_help)]
          if top_k else []),
        click.option("--selection", type=click.Choice(SELECTIONS), default=DEFAULTS.selection, show_default=True,
                     help="How Top-K is found: exact scores every key, page reads per-page key bounds (Quest), "
                     "compact scores fitted page tokens (SPEC 8)."),
        click.option("--page-size", type=int, default=DEFAULTS.page_size, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def mass_options(fn=None, *, dropped_mass: bool = True):
    """``--budget --max-dropped-mass --min-top-k --certify`` (SPEC 10), defaults from ``topkphi.Config()``;
    ``dropped_mass=False`` where the command has its own ``--max-dropped-mass``."""
    if fn is None:
        return lambda f: mass_options(f, dropped_mass=dropped_mass)
    options = [
        click.option("--budget", type=click.Choice(BUDGETS), default=DEFAULTS.budget, show_default=True,
                     help="Per-head budget: fixed = --top-k per KV head; mass = units in score order until the "
                     "estimated dropped mass <= --max-dropped-mass (--top-k the cap, --min-top-k the floor); "
                     "marginal = a layer's total of --top-k per head spread by the estimated gain of one more "
                     "unit."),
        *([click.option("--max-dropped-mass", type=float, default=DEFAULTS.max_dropped_mass, show_default=True,
                        help="--budget mass: the attention mass a KV head may leave unread, in (0, 1).")]
          if dropped_mass else []),
        click.option("--min-top-k", type=int, default=DEFAULTS.min_top_k, show_default=True,
                     help="--budget mass/marginal: tokens every KV head retrieves at least (the floor)."),
        click.option("--certify", is_flag=True,
                     help="--budget mass: read until the Quest bound certifies the dropped mass (selection page "
                     "or exact), or the cap; the stats say where the cap stopped it."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def estimator_options(fn=None, *, per_prompt: bool = False, dense: bool = True):
    """``--feature-map --n-features --phi-file [--dense]``; ``per_prompt`` adds ``learned-prompt`` (chat)."""
    if fn is None:
        return lambda f: estimator_options(f, per_prompt=per_prompt, dense=dense)
    fmap_help = ("Estimate of the unread mass; default = the compact tokens' own with --selection compact, none "
                 "otherwise; none = Top-K only; learned = the maps of --phi-file"
                 + ("; learned-prompt = maps fitted on each new prompt's own queries (warm-started from --phi-file "
                    "if given)." if per_prompt else "."))
    options = [
        click.option("--feature-map", type=click.Choice(estimator_names(per_prompt)), default=DEFAULT_ESTIMATOR,
                     show_default=True, help=fmap_help),
        click.option("--n-features", type=int, default=DEFAULTS.n_features, show_default=True,
                     help="Feature-map size m."),
        click.option("--n-clusters", type=int, default=DEFAULTS.n_clusters, show_default=True,
                     help="Clusters of --feature-map cluster (SPEC 8.1)."),
        click.option("--fit-window", type=int, default=DEFAULTS.fit_window, show_default=True,
                     help="Prompt query rows the fitted summaries (cluster, compact) are fitted from."),
        phi_file_option,
        *([click.option("--dense", is_flag=True, help="Exact attention over the whole cache (the baseline).")]
          if dense else []),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def seed_option(fn):
    return click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
                        help="Seed of the random features (and of sampling).")(fn)


def phi_file_option(fn):
    """``--phi-file F``: learned maps from ``topkphi calibrate`` (needed by ``--feature-map learned``)."""
    return click.option("--phi-file", default=None, type=click.Path(dir_okay=False),
                        help="Learned feature maps from `topkphi calibrate` (for --feature-map learned).")(fn)


def check_phi_options(feature_map: str, phi_file: str | None) -> None:
    """Before any model loads: the flags agree and the file exists."""
    if feature_map == "learned" and phi_file is None:
        raise click.UsageError("--feature-map learned needs --phi-file (make one with `topkphi calibrate`)")
    if phi_file is not None and feature_map not in ("learned", "learned-prompt"):
        raise click.UsageError("--phi-file is used only with --feature-map learned or learned-prompt")
    if phi_file is not None and not Path(phi_file).is_file():
        raise click.UsageError(f"no such phi file: {phi_file}")


def config_from_options(top_k, n_sink, n_tail, selection, page_size, feature_map, n_features, seed=DEFAULTS.seed,
                        n_clusters=DEFAULTS.n_clusters, fit_window=DEFAULTS.fit_window, budget=DEFAULTS.budget,
                        max_dropped_mass=DEFAULTS.max_dropped_mass, min_top_k=DEFAULTS.min_top_k, certify=False):
    """The ``Config`` the flags describe (a bad value: one line, exit 2); learned maps are per layer and
    filled in once the model is loaded."""
    fmap = None if feature_map in ("none", "learned", "learned-prompt") else feature_map
    try:
        return Config(n_sink=n_sink, n_tail=n_tail, top_k=top_k, selection=selection, page_size=page_size,
                      feature_map=fmap, n_features=n_features, seed=seed, n_clusters=n_clusters,
                      fit_window=fit_window, budget=budget, max_dropped_mass=max_dropped_mass,
                      min_top_k=min_top_k, certify=certify)
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def output_path(path: str | Path | None, option: str, suffix: str | None = None) -> Path | None:
    """Check an output file before the work that fills it: not a folder, the right suffix; its folder is made."""
    if path is None or str(path) == "-":
        return None if path is None else Path("-")
    out = Path(path)
    if out.is_dir():
        raise click.UsageError(f"{option} {path} is a folder, not a file")
    if suffix is not None and out.suffix.lower() != suffix:
        raise click.UsageError(f"{option} writes a {suffix[1:].upper()} file: {path} does not end in {suffix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise click.UsageError(f"{option} {path}: cannot make its folder ({err.strerror})") from None
    return out


def require_module(module: str, option: str, extra: str) -> None:
    """An option that needs an optional package fails before the work, not after it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise click.UsageError(f'{option} needs {module}: pip install "topkphi[{extra}]"')
