"""`topkphi chat`: talk to a model whose decode steps read only part of the KV cache."""

from __future__ import annotations

import importlib.util
import sys

import click
from click.core import ParameterSource

from topkphi.commands.errors import user_errors
from topkphi.commands.options import (
    DEFAULTS,
    backend_option,
    budget_options,
    check_phi_options,
    config_from_options,
    estimator_options,
    mass_options,
    model_option,
)
from topkphi.commands.runtime import check_phi_model, read_phi_file, resolve_runtime
from topkphi.generation.stats import LEGEND

HELP = ("Commands: 'q' (or Ctrl-D) quits, 'r' resets the conversation, 'h' shows this help. Ctrl-C stops a reply; "
        "at the prompt it quits.")
INTERRUPTED = 130  # the exit status of a one-shot reply stopped by Ctrl-C (128 + SIGINT)


def load_engine(model: str, backend: str, cfg, dense: bool, phi_file: str | None = None, warn=None,
                fit_seconds: float | None = None, n_features: int | None = None, fit_steps: int | None = None):
    """The model on the chosen runtime, wrapped in its generation engine; ``phi_file`` gives each layer its
    learned maps (the file is read before the model loads, then checked against it). ``fit_seconds`` or
    ``fit_steps``: fit the maps on each new prompt within that budget (warm-started from ``phi_file``)."""
    from topkphi.calibration.prompt import LEARNED_FEATURES, PromptFitter

    runtime = resolve_runtime(backend)
    maps = meta = None
    if not dense and phi_file is not None:
        maps, meta = read_phi_file(phi_file)
    net, tokenizer = runtime.load(model)
    if maps is not None:
        check_phi_model(phi_file, meta, runtime, net, model, cfg, warn)
    fitter = None
    if not dense and (fit_seconds is not None or fit_steps is not None):
        fitter = PromptFitter(net, runtime.framework, cfg, fit_seconds, n_features or LEARNED_FEATURES, maps,
                              notify=warn, steps=fit_steps, device=runtime.fit_device)
        cfg = fitter.fallback()  # until the first prompt is fitted
    elif maps is not None:
        from topkphi.config import per_layer_config

        cfg = per_layer_config(cfg, maps)
    engine = runtime.engine(net, tokenizer, None if dense else cfg, prompt_fitter=fitter, notify=warn)
    return engine, runtime


def chat_tokens(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return list(tokenizer.encode(text))


def exact_note(cfg, dense: bool, n_tokens: int) -> str | None:
    """Why a reply read the whole cache although topkphi ran: the context fits in sink + tail + Top-K."""
    if dense or cfg is None:
        return None
    layer0 = cfg(0) if callable(cfg) else cfg
    reach = layer0.n_sink + layer0.n_tail + layer0.top_k
    if n_tokens > reach:
        return None
    return (f"note: the context ({n_tokens} tokens) fits in sink {layer0.n_sink} + tail {layer0.n_tail} + top-k "
            f"{layer0.top_k}: every step read it all (exact attention, nothing estimated); `--demo` has a long prompt")


def read_line(console) -> str:
    """The next input line, with line editing and history where readline exists (as in any shell REPL)."""
    try:
        import readline  # noqa: F401 - importing it gives input() editing and history
    except ImportError:  # Windows
        pass
    return console.input("[bold cyan]>> [/]")


@click.command()
@model_option
@backend_option
@click.option("--prompt", "-p", default=None, help="One-shot: answer this prompt and exit ('-' reads stdin).")
@click.option("--demo", is_flag=True, help="One-shot on a built-in ~1,500-token prompt (a log with a question), so "
              "the stats line shows what the method reads.")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
              help="Seed of the random features and of sampling.")
@click.option("--system-prompt", default=None)
@budget_options
@mass_options
@estimator_options(per_prompt=True)
@click.option("--fit-seconds", type=float, default=30.0, show_default=True,
              help="--feature-map learned-prompt: time budget of the fit on each new prompt (after its prefill, "
              "which captures the prompt's queries).")
@click.option("--fit-steps", type=int, default=None,
              help="--feature-map learned-prompt: Adam steps per layer instead of a time budget (the same fit on "
              "any machine).")
@user_errors
def chat(model, backend, prompt, demo, max_tokens, temp, top_p, seed, system_prompt, n_sink, n_tail, top_k, selection,
         page_size, budget, max_dropped_mass, min_top_k, certify, feature_map, n_features, n_clusters, fit_window,
         phi_file, dense, fit_seconds, fit_steps) -> None:
    """Chat with a model; decode steps read sink + tail + Top-K exactly and estimate the rest."""
    from rich.console import Console

    ctx = click.get_current_context()
    if max_tokens < 1:
        raise click.UsageError("--max-tokens must be >= 1")
    if not 0.0 < top_p <= 1.0 or temp < 0:
        raise click.UsageError("--top-p must be in (0, 1] and --temp >= 0")
    if demo and prompt is not None:
        raise click.UsageError("give --demo or --prompt, not both")
    cfg = config_from_options(top_k, n_sink, n_tail, selection, page_size, feature_map, n_features, seed,
                              n_clusters=n_clusters, fit_window=fit_window, budget=budget,
                              max_dropped_mass=max_dropped_mass, min_top_k=min_top_k, certify=certify)
    check_phi_options(feature_map, phi_file)
    per_prompt = feature_map == "learned-prompt"
    fit_budget = _fit_budget(ctx, per_prompt, fit_seconds, fit_steps)
    if per_prompt and ctx.get_parameter_source("n_features") is ParameterSource.DEFAULT:
        n_features = None  # the fitter's own m for maps fitted from scratch
    one_shot = _one_shot_text(prompt, demo)
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)

    def note(text: str) -> None:
        err.print(text, style="dim", markup=False, soft_wrap=True)

    engine, runtime = load_engine(model, backend, cfg, dense, phi_file, note, fit_seconds=fit_budget[0],
                                  n_features=n_features, fit_steps=fit_budget[1])
    note(f"{model} on {runtime.device} ({'dense' if dense else runtime.kernel_backend})")
    if not dense and n_sink + n_tail >= _max_context(engine.model):
        note(f"note: --n-sink {n_sink} + --n-tail {n_tail} cover the model's whole context "
             f"({_max_context(engine.model)} tokens): every step reads all of it (dense)")
    history = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def reply(text: str) -> bool:
        """Answer ``text``; False when Ctrl-C stopped the reply (the partial answer stays in the history)."""
        history.append({"role": "user", "content": text})
        ids = chat_tokens(engine.tokenizer, history)
        answer, finished = [], True
        pieces = engine.stream(ids, max_tokens, temp, top_p, seed)
        try:
            for piece in pieces:
                answer.append(piece)
                console.print(piece, end="", markup=False, soft_wrap=True)
        except KeyboardInterrupt:
            finished = False
        finally:
            pieces.close()  # an interrupted reply leaves the cache consistent for the next one
        console.print()
        history.append({"role": "assistant", "content": "".join(answer)})
        if not finished:
            note("(reply stopped by Ctrl-C; the conversation goes on)")
        note(engine.stats.line(max(40, err.width)))
        exact = exact_note(engine.cfg, dense, len(ids) + len(answer))
        if exact:
            note(exact)
        return finished

    if one_shot is not None:
        if not reply(one_shot):
            ctx.exit(INTERRUPTED)
        return
    note(HELP)
    while True:
        try:
            text = read_line(console)
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        command = text.strip()
        if command == "q":
            break
        if command == "r":
            history = history[:1] if system_prompt else []
            engine.reset()
            note("conversation reset" + (" (the system prompt stays)" if system_prompt else ""))
            continue
        if command == "h":
            note(HELP)
            note(LEGEND)
            continue
        if command:
            reply(text)


def _fit_budget(ctx, per_prompt: bool, fit_seconds: float, fit_steps: int | None) -> tuple:
    """``(seconds, None)``, ``(None, steps)``, or ``(None, None)`` without a per-prompt fit."""
    seconds_given = ctx.get_parameter_source("fit_seconds") is not ParameterSource.DEFAULT
    if not per_prompt:
        if seconds_given or fit_steps is not None:
            raise click.UsageError("--fit-seconds and --fit-steps go with --feature-map learned-prompt")
        return None, None
    if importlib.util.find_spec("torch") is None:
        raise click.UsageError('--feature-map learned-prompt fits with torch: pip install "topkphi[torch]"')
    if fit_steps is not None:
        if seconds_given:
            raise click.UsageError("give --fit-seconds or --fit-steps, not both")
        if fit_steps < 1:
            raise click.UsageError(f"--fit-steps must be >= 1, got {fit_steps}")
        return None, fit_steps
    if not fit_seconds > 0:
        raise click.UsageError(f"--fit-seconds must be > 0, got {fit_seconds}")
    return fit_seconds, None


def _one_shot_text(prompt: str | None, demo: bool) -> str | None:
    if demo:
        from topkphi.commands.chat_demo import demo_prompt

        return demo_prompt()
    if prompt is None:
        return None
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise click.UsageError("the prompt is empty" + (" (nothing on stdin)" if prompt == "-" else ""))
    return text


def _max_context(net) -> int:
    """The model's trained context length (HF config or mlx-lm args); a large number when it says none."""
    for holder in (getattr(net, "config", None), getattr(net, "args", None)):
        value = getattr(holder, "max_position_embeddings", None)
        if value:
            return int(value)
    return 1 << 30
