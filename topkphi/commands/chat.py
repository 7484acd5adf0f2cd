"""`topkphi chat`: talk to a model whose decode steps read only part of the KV cache."""

from __future__ import annotations

import importlib.util
import sys

import click
from click.core import ParameterSource

from topkphi.commands.calibrate import check_phi_options, load_layer_maps, phi_file_option
from topkphi.commands.errors import user_errors
from topkphi.commands.runtime import RUNTIMES, config_from_options, resolve_runtime, topkphi_options
from topkphi.config import per_layer_config

# learned maps from scratch: m = 16 generalized better than 32 in every fit measured (docs/RESULTS.md)
PROMPT_FEATURES = 16
HELP = "Commands: 'q' quits, 'r' resets the conversation, 'h' shows this help."


def load_engine(model: str, backend: str, cfg, dense: bool, phi_file: str | None = None, warn=None,
                fit_seconds: float | None = None, n_features: int = PROMPT_FEATURES):
    """The model on the chosen runtime, wrapped in its generation engine; ``phi_file`` gives
    each layer its learned maps (checked against the loaded model). ``fit_seconds``: fit the maps on
    each new prompt within this budget (``PromptFitter``; warm-started from ``phi_file`` if given)."""
    import topkphi

    runtime = resolve_runtime(backend)
    kernel = None if dense else topkphi.get_backend(runtime.kernel_backend)
    if runtime.framework == "torch":
        from topkphi.generation.torch_engine import TorchEngine as engine_cls
        from topkphi.models.resolve import load_torch_model

        net, tokenizer = load_torch_model(model, device=runtime.device)
    else:
        from topkphi.generation.mlx_engine import MLXEngine as engine_cls
        from topkphi.models.resolve import load_mlx_model

        net, tokenizer = load_mlx_model(model)
    maps = None
    if not dense and phi_file is not None:
        maps = load_layer_maps(phi_file, net, model, runtime.framework, cfg, warn)
    fitter = None
    if not dense and fit_seconds is not None:
        from topkphi.calibration.prompt import PromptFitter

        fitter = PromptFitter(net, runtime.framework, cfg, fit_seconds, n_features, maps, notify=warn)
        cfg = fitter.fallback()  # until the first prompt is fitted
    elif maps is not None:
        cfg = per_layer_config(cfg, maps)
    return engine_cls(net, tokenizer, None if dense else cfg, kernel, prompt_fitter=fitter, notify=warn), runtime


def chat_tokens(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return list(tokenizer.encode(text))


@click.command()
@click.option("--model", "-m", default="smollm2-135m", show_default=True,
              help="Alias, local HF folder, .gguf file or hub id.")
@click.option("--backend", type=click.Choice(RUNTIMES), default="auto", show_default=True,
              help="auto: CUDA if present, else MLX on Metal, else torch on the CPU, else MLX on the CPU.")
@click.option("--prompt", "-p", default=None, help="One-shot: answer this prompt and exit ('-' reads stdin).")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--system-prompt", default=None)
@topkphi_options(per_prompt=True)
@phi_file_option
@click.option("--fit-seconds", type=float, default=30.0, show_default=True,
              help="--feature-map learned-prompt: time budget of the fit on each new prompt, added to its prefill "
              "with one extra prefill pass that captures the prompt's queries.")
@user_errors
def chat(model, backend, prompt, max_tokens, temp, top_p, seed, system_prompt, top_k, n_sink, n_tail, selection,
         page_size, feature_map, n_features, dense, phi_file, fit_seconds) -> None:
    """Chat with a model; decode steps read sink + tail + Top-K exactly and estimate the rest."""
    from rich.console import Console

    if max_tokens < 1:
        raise click.UsageError("--max-tokens must be >= 1")
    if not 0.0 < top_p <= 1.0 or temp < 0:
        raise click.UsageError("--top-p must be in (0, 1] and --temp >= 0")
    cfg = config_from_options(top_k, n_sink, n_tail, selection, page_size, feature_map, n_features, seed)
    check_phi_options(feature_map, phi_file)
    per_prompt = feature_map == "learned-prompt"
    if per_prompt:
        if not fit_seconds > 0:
            raise click.UsageError(f"--fit-seconds must be > 0, got {fit_seconds}")
        if importlib.util.find_spec("torch") is None:
            raise click.UsageError('--feature-map learned-prompt fits with torch: pip install "topkphi[torch]"')
        if click.get_current_context().get_parameter_source("n_features") is ParameterSource.DEFAULT:
            n_features = PROMPT_FEATURES
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    engine, runtime = load_engine(model, backend, cfg, dense, phi_file, lambda text: err.print(f"[dim]{text}[/dim]"),
                                  fit_seconds if per_prompt else None, n_features)
    err.print(f"[dim]{model} on {runtime.device} ({'dense' if dense else runtime.kernel_backend})[/dim]")
    history = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def reply(text: str) -> None:
        history.append({"role": "user", "content": text})
        answer = []
        for piece in engine.stream(chat_tokens(engine.tokenizer, history), max_tokens, temp, top_p, seed):
            answer.append(piece)
            console.print(piece, end="", markup=False, soft_wrap=True)
        console.print()
        history.append({"role": "assistant", "content": "".join(answer)})
        err.print(f"[dim]{engine.stats.line()}[/dim]")

    if prompt is not None:
        reply(sys.stdin.read() if prompt == "-" else prompt)
        return
    err.print(f"[dim]{HELP}[/dim]")
    while True:
        try:
            text = console.input("[bold cyan]>> [/]")
        except (EOFError, KeyboardInterrupt):
            break
        command = text.strip()
        if command == "q":
            break
        if command == "r":
            history = history[:1] if system_prompt else []
            engine.reset()
            continue
        if command == "h":
            err.print(HELP)
            continue
        if command:
            reply(text)
