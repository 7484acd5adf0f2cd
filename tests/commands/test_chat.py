"""`topkphi chat` end to end: one-line errors for bad input (before any model loads), the interactive
commands, Ctrl-C stopping a reply only, the notes that say when nothing is estimated, and the real
default model in one-shot mode (slow)."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from topkphi.cli import main
from topkphi.generation.stats import GenerationStats

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch and transformers are not installed")
# Top-K only with exact selection: a topkphi cache (crops, per-layer lengths) at its simplest
TOP_K_ONLY = ["--feature-map", "none", "--selection", "exact", "--top-k", "16", "--n-tail", "16"]


def run(*args, stdin=None):
    return CliRunner().invoke(main, ["chat", *args], input=stdin)


def assert_usage_error(result, fragment):
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and fragment in error_lines[0], result.output
    assert "Traceback" not in result.output


class ChatTokenizer:
    """One token per character, within the tiny model's vocabulary of 96; no chat template."""

    eos_token_id = None

    def encode(self, text):
        return [ord(c) % 96 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(33 + i % 90) for i in ids)


def mlx_tokenizer():
    """mlx-lm's tokenizer wrapper around a word-level vocabulary: every word is a token (digits their own)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({str(i): i for i in range(96)}, unk_token="0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=words))


RUNTIMES = [
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch and transformers are not installed")),
    pytest.param("mlx", marks=pytest.mark.skipif(not (HAS_MLX and HAS_TORCH), reason="needs mlx, mlx-lm and "
                                                 "transformers (for the test tokenizer)")),
]


@pytest.fixture
def tiny(monkeypatch, request):
    """``--backend`` (torch, or mlx with ``request.param``) loading a tiny random Llama."""
    import topkphi.models.resolve as resolve

    backend = getattr(request, "param", "torch")
    if backend == "torch":
        from tests.integrations.test_hf import tiny_llama

        monkeypatch.setattr(resolve, "load_torch_model", lambda spec, device="cpu", **kw: (tiny_llama(),
                                                                                            ChatTokenizer()))
    else:
        from tests.integrations.test_mlx_lm import tiny_llama

        monkeypatch.setattr(resolve, "load_mlx_model", lambda spec, **kw: (tiny_llama(), mlx_tokenizer()))
    return backend


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the input must be refused before it."""
    import topkphi.models.resolve as resolve

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(resolve, "load_torch_model", refuse)
    monkeypatch.setattr(resolve, "load_mlx_model", refuse)


def test_unknown_model_path(tmp_path):
    assert_usage_error(run("--model", str(tmp_path / "nope"), "-p", "hi"), "nope")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 11)
    assert_usage_error(run("--model", str(bad), "-p", "hi"), "broken.gguf")


def test_triton_without_cuda_names_the_available_ones():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_usage_error(run("--backend", "triton", "-p", "hi"), "available:")
    assert_usage_error(run("--backend", "cuda", "-p", "hi"), "available:")  # the old name, same answer


@pytest.mark.parametrize("flag,value,fragment", [("--top-k", "0", "top_k must be >= 1"),
                                                 ("--n-tail", "-1", "n_tail must be >= 0"),
                                                 ("--max-tokens", "0", "--max-tokens")])
def test_impossible_budgets(no_model, flag, value, fragment):
    assert_usage_error(run(flag, value, "-p", "hi"), fragment)


@pytest.mark.parametrize("args,stdin", [(["-p", ""], None), (["-p", "  \n"], None), (["-p", "-"], "")])
def test_empty_prompt_is_refused_before_the_model_loads(no_model, args, stdin):
    assert_usage_error(run(*args, stdin=stdin), "the prompt is empty")


def test_phi_file_problems_are_found_before_the_model_loads(no_model, tmp_path):
    assert_usage_error(run("--feature-map", "learned", "-p", "hi"), "--phi-file")
    assert_usage_error(run("--feature-map", "learned", "--phi-file", str(tmp_path / "nope.safetensors"), "-p", "hi"),
                       "no such phi file")
    pytest.importorskip("safetensors")
    bad = tmp_path / "phi.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert_usage_error(run("--feature-map", "learned", "--phi-file", str(bad), "-p", "hi"), "phi")


def test_fit_budget_options(no_model):
    assert_usage_error(run("--fit-steps", "3", "-p", "hi"), "learned-prompt")
    if HAS_TORCH:
        args = ["--feature-map", "learned-prompt", "-p", "hi"]
        assert_usage_error(run(*args, "--fit-steps", "3", "--fit-seconds", "2"), "not both")
        assert_usage_error(run(*args, "--fit-steps", "0"), "--fit-steps")
        assert_usage_error(run(*args, "--fit-seconds", "0"), "--fit-seconds")


def test_demo_and_prompt_exclude_each_other(no_model):
    assert_usage_error(run("--demo", "-p", "hi"), "not both")


def test_the_stats_line_breaks_between_fields_only():
    stats = GenerationStats(prompt_tokens=123456, prefill_s=1.0, generated_tokens=4096, decode_s=100.0,
                            read_fraction=0.0412, rho=0.031, fit_s=12.3)
    fields = stats.fields()
    for width in (40, 80, 120):
        lines = stats.line(width).splitlines()
        assert all(len(line) <= width for line in lines), (width, lines)
        assert [f for line in lines for f in line.split(" | ")] == fields  # every field whole, in order
    assert len(stats.line(200).splitlines()) == 1


@pytest.mark.parametrize("tiny", RUNTIMES, indirect=True)
def test_help_reset_and_the_stats_legend(tiny):
    result = run("--backend", tiny, "--dense", "--max-tokens", "3", stdin="h\nhello\nr\nq\n")
    assert result.exit_code == 0, result.output
    assert "KV read = mean share" in result.output and "rho = " in result.output  # `h` explains the stats
    assert "conversation reset" in result.output  # `r` says it did something
    assert result.output.count("decode 3 tok") == 1


@needs_torch
def test_old_backend_name_is_accepted_with_a_note(tiny):
    result = run("--backend", "cpu", "--dense", "--max-tokens", "2", "-p", "hi")
    assert result.exit_code == 0, result.output
    assert "--backend cpu is an old name" in result.output


@pytest.mark.parametrize("tiny", RUNTIMES, indirect=True)
def test_budgets_that_cover_the_context_say_so(tiny):
    result = run("--backend", tiny, *TOP_K_ONLY[:-2], "--n-tail", "999999", "--max-tokens", "2", "-p", "hi")
    assert result.exit_code == 0, result.output
    assert "cover the model's whole context" in result.output
    assert "every step read it all" in result.output


@pytest.mark.parametrize("tiny", RUNTIMES, indirect=True)
def test_the_demo_prompt_shows_partial_reads(tiny):
    result = run("--backend", tiny, "--demo", *TOP_K_ONLY, "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    prefill = next(line for line in result.output.splitlines() if "prefill" in line)
    assert int(prefill.split("prefill ")[1].split(" tok")[0]) > 1000
    assert "KV read 100.0%" not in result.output and "every step read it all" not in result.output


def interrupt_at(monkeypatch, backend: str, at_call: int):
    """Ctrl-C inside the model's second layer at its ``at_call``-th forward (the first is the prefill): the
    first layer has taken the token into its cache, the second has not."""
    if backend == "torch":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer as layer_class
    else:
        from mlx_lm.models.llama import TransformerBlock as layer_class
    call, calls = layer_class.__call__, {}

    def call_or_interrupt(self, *args, **kwargs):
        second = getattr(getattr(self, "self_attn", None), "layer_idx", None) == 1 if backend == "torch" \
            else calls.get("second") is self
        if second:
            calls["n"] = calls.get("n", 0) + 1
            if calls["n"] == at_call:
                raise KeyboardInterrupt
        return call(self, *args, **kwargs)

    if backend == "mlx":
        import topkphi.models.resolve as resolve

        load = resolve.load_mlx_model

        def load_and_mark(spec, **kw):
            net, tokenizer = load(spec, **kw)
            calls["second"] = net.layers[1]
            return net, tokenizer

        monkeypatch.setattr(resolve, "load_mlx_model", load_and_mark)
    monkeypatch.setattr(layer_class, "__call__", call_or_interrupt)


@pytest.mark.parametrize("tiny", RUNTIMES, indirect=True)
def test_ctrl_c_stops_the_reply_not_the_chat(tiny, monkeypatch):
    interrupt_at(monkeypatch, tiny, at_call=3)
    result = run("--backend", tiny, *TOP_K_ONLY, "--max-tokens", "6", stdin="hello\nand again\nq\n")
    assert result.exit_code == 0, result.output
    assert "Aborted" not in result.output
    assert result.output.count("reply stopped by Ctrl-C") == 1
    assert result.output.count("decode ") == 2  # a stats line for the stopped reply and for the next
    assert "decode 6 tok" in result.output  # the second reply ran in full


@pytest.mark.parametrize("tiny", RUNTIMES, indirect=True)
def test_ctrl_c_in_one_shot_mode_exits_130(tiny, monkeypatch):
    interrupt_at(monkeypatch, tiny, at_call=2)
    result = run("--backend", tiny, "--dense", "--max-tokens", "6", "-p", "hello")
    assert result.exit_code == 130, result.output
    assert "reply stopped by Ctrl-C" in result.output


@pytest.mark.parametrize("tiny", RUNTIMES, indirect=True)
def test_an_interrupted_reply_leaves_a_cache_the_next_turn_can_reuse(tiny, monkeypatch):
    """Interrupted between two layers, the cache is cut back to what every layer holds: the next turn
    answers exactly as a fresh engine given the whole conversation."""
    import numpy as np

    import topkphi
    from topkphi.commands.runtime import resolve_runtime

    interrupt_at(monkeypatch, tiny, at_call=4)
    runtime = resolve_runtime(tiny)
    net, tokenizer = runtime.load("tiny")
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=16, selection="exact", feature_map=None)
    engine = runtime.engine(net, tokenizer, cfg)
    prompt = np.random.default_rng(0).integers(1, 96, 120).tolist()
    with pytest.raises(KeyboardInterrupt):
        for _ in engine.stream(prompt, max_tokens=8):
            pass
    lengths = {k.shape[2] for k, _ in engine.kv()}
    assert len(lengths) == 1 and lengths.pop() <= len(engine.tokens) and len(engine.tokens) > len(prompt)
    follow = engine.tokens + [7, 8, 9]
    for _ in engine.stream(follow, max_tokens=6):
        pass
    assert engine.tokens[len(follow):] == runtime.engine(net, tokenizer, cfg).generate(follow, 6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")),
    pytest.param("torch", marks=needs_torch),
])
def test_default_model_answers_in_one_shot_mode(backend):
    """The real SmolLM2-135M (downloaded and converted once into the cache) through topkphi."""
    result = run("--backend", backend, "--max-tokens", "12", "--top-k", "16", "--n-tail", "8",
                 "-p", "-", stdin="What is the capital of France? Answer in one word.")
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
    assert "tok/s" in result.output and "KV read" in result.output


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")
def test_interactive_commands_and_multi_turn():
    session = "h\nWhat is the capital of France? One word.\nAnd of Italy? One word.\nr\nq\n"
    result = run("--backend", "mlx", "--max-tokens", "8", "--top-k", "16", "--n-tail", "8", "--selection", "exact",
                 "--feature-map", "prf", stdin=session)
    assert result.exit_code == 0, result.output
    assert result.output.count("Commands:") >= 2  # the banner and the 'h' answer
    assert "Paris" in result.output and "Rome" in result.output  # the second turn saw the first
    assert result.output.count("KV read") >= 2  # one stats line per reply (and the legend)


@pytest.mark.parametrize("budget, certify", [("mass", True), ("marginal", False)])
def test_per_head_budgets_show_their_reads_and_dropped_mass(tiny, budget, certify):
    args = ["--budget", budget, "--selection", "exact", "--feature-map", "none", "--top-k", "64",
            "--min-top-k", "8", "--n-tail", "16", *(["--certify", "--max-dropped-mass", "0.2"] if certify else [])]
    result = run("--backend", "torch", "--demo", *args, "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.splitlines())
    assert "p95 " in line and "drop " in line and "capped " in line
    assert ("cert " in line) == certify
