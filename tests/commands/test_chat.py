"""`topkphi chat` end to end: the real default model in one-shot mode, and one-line errors for bad input."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from topkphi.cli import main

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def run(*args, stdin=None):
    return CliRunner().invoke(main, ["chat", *args], input=stdin)


def assert_usage_error(result, fragment):
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and fragment in error_lines[0], result.output
    assert "Traceback" not in result.output


def test_unknown_model_path(tmp_path):
    assert_usage_error(run("--model", str(tmp_path / "nope"), "-p", "hi"), "nope")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 11)
    assert_usage_error(run("--model", str(bad), "-p", "hi"), "broken.gguf")


def test_cuda_backend_without_cuda_names_the_available_ones():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_usage_error(run("--backend", "cuda", "-p", "hi"), "available:")


@pytest.mark.parametrize("flag,value,fragment", [("--top-k", "0", "top_k must be >= 1"),
                                                 ("--n-tail", "-1", "n_tail must be >= 0"),
                                                 ("--max-tokens", "0", "--max-tokens")])
def test_impossible_budgets(flag, value, fragment):
    assert_usage_error(run(flag, value, "-p", "hi"), fragment)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")),
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch and transformers are not installed")),
])
def test_default_model_answers_in_one_shot_mode(backend):
    """The real SmolLM2-135M (downloaded and converted once into the cache) through topkphi."""
    result = run("--backend", backend, "--max-tokens", "12", "--top-k", "16", "--n-tail", "8",
                 "-p", "-", stdin="What is the capital of France? Answer in one word.")
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
    assert "tok/s" in result.output and "KV read/step" in result.output


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")
def test_interactive_commands_and_multi_turn():
    session = "h\nWhat is the capital of France? One word.\nAnd of Italy? One word.\nr\nq\n"
    result = run("--backend", "mlx", "--max-tokens", "8", "--top-k", "16", "--n-tail", "8", stdin=session)
    assert result.exit_code == 0, result.output
    assert result.output.count("Commands:") >= 2  # the banner and the 'h' answer
    assert "Paris" in result.output and "Rome" in result.output  # the second turn saw the first
    assert result.output.count("KV read/step") == 2  # one stats line per reply


def test_learned_maps_need_a_phi_file():
    assert_usage_error(run("--feature-map", "learned", "-p", "hi"), "--phi-file")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")
def test_corrupt_phi_file(tmp_path):
    bad = tmp_path / "phi.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert_usage_error(run("--backend", "mlx", "--feature-map", "learned", "--phi-file", str(bad), "-p", "hi"),
                       "phi")
