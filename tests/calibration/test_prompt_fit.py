"""Per-prompt learned maps in the generation engines: fitted when a prompt starts a new cache, kept
across turns of one conversation, a clear fallback for prompts too short to fit on."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="per-prompt fitting needs torch (pip install 'topkphi[torch]')")
pytest.importorskip("transformers", reason="the torch engine needs transformers")

import topkphi  # noqa: E402
from tests.integrations.test_hf import DigitTokenizer, tiny_llama  # noqa: E402
from topkphi.calibration.prompt import PromptFitter  # noqa: E402
from topkphi.generation.torch_engine import TorchEngine  # noqa: E402

CFG = topkphi.Config(n_sink=4, n_tail=16, top_k=16, selection="exact")


def prompt(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, 96, n).tolist()


def engine_with(fitter, notes=None):
    return TorchEngine(fitter.net, DigitTokenizer(), fitter.fallback(), topkphi.get_backend("torch"),
                       prompt_fitter=fitter, notify=None if notes is None else notes.append)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_fit_on_a_new_prompt_kept_across_turns_and_refitted_after_reset(model):
    fitter = PromptFitter(model, "torch", CFG, time_budget_s=0.5, n_features=8)
    assert fitter.min_prompt == 4 + 16 + 16 + 8 * 8
    engine = engine_with(fitter)
    assert engine.cfg.feature_map is None  # Top-K only until a prompt has been fitted
    ids = prompt(200)
    reply = engine.generate(ids, 5)
    first = engine.cfg
    maps = [first(i).feature_map for i in range(2)]
    assert all(m.kind == "learned" and m.n_features == 8 and m.w_q.shape == (2, 8, 16) for m in maps)
    assert engine.stats.fit_s > 0 and "phi fit" in engine.stats.line()
    assert engine.stats.rho > 0  # the fitted completion took part in the decode steps

    list(engine.stream(ids + reply + prompt(10, seed=2), max_tokens=3))  # the next turn reuses the cache
    assert engine.cfg is first and engine.stats.fit_s == 0 and "phi fit" not in engine.stats.line()

    engine.reset()
    engine.generate(prompt(200, seed=3), 3)  # a new conversation: fitted again, on its own queries
    assert engine.cfg is not first and engine.stats.fit_s > 0
    assert not np.allclose(engine.cfg(0).feature_map.w_q, maps[0].w_q)


def test_too_short_prompts_decode_top_k_only_and_say_why(model):
    notes = []
    engine = engine_with(PromptFitter(model, "torch", CFG, time_budget_s=0.5, n_features=8), notes)
    tokens = engine.generate(prompt(60), 4)
    assert len(tokens) == 4 and engine.cfg.feature_map is None and engine.stats.fit_s == 0
    assert len(notes) == 1 and "too short" in notes[0] and "Top-K only" in notes[0]


def test_warm_start_from_file_maps(model):
    rng = np.random.default_rng(0)
    file_maps = [topkphi.FeatureMap.learned(0.3 * rng.standard_normal((2, 4, 16)), np.zeros((2, 4)),
                                            0.3 * rng.standard_normal((2, 4, 16)), np.zeros((2, 4))) for _ in range(2)]
    notes = []
    fitter = PromptFitter(model, "torch", CFG, time_budget_s=0.5, n_features=8, init_maps=file_maps)
    assert fitter.opts.n_features == 4  # the file's m, not n_features
    engine = engine_with(fitter, notes)
    engine.generate(prompt(40), 2)  # too short: the file's maps
    assert engine.cfg(1).feature_map is file_maps[1] and "phi file" in notes[0]
    engine.reset()
    engine.generate(prompt(200), 2)
    refined = engine.cfg(1).feature_map
    assert refined.n_features == 4 and not np.allclose(refined.w_k, file_maps[1].w_k)


def test_bad_budget_is_refused(model):
    with pytest.raises(ValueError, match="budget"):
        PromptFitter(model, "torch", CFG, time_budget_s=0, n_features=8)


def test_mlx_engine_fits_per_prompt():
    pytest.importorskip("mlx_lm", reason="the MLX engine needs mlx and mlx-lm")
    from tests.integrations.test_mlx_lm import digit_tokenizer
    from tests.integrations.test_mlx_lm import tiny_llama as tiny_mlx
    from topkphi.generation.mlx_engine import MLXEngine

    net = tiny_mlx()
    fitter = PromptFitter(net, "mlx", CFG, time_budget_s=0.5, n_features=8)
    engine = MLXEngine(net, digit_tokenizer(), fitter.fallback(), topkphi.get_backend("mlx"), prompt_fitter=fitter)
    assert len(engine.generate(prompt(200), 4)) == 4
    assert engine.cfg(0).feature_map.kind == "learned" and engine.stats.fit_s > 0 and engine.stats.rho > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_model_fits_on_its_gpu_like_on_the_cpu():
    import dataclasses

    from topkphi.calibration.fit import fit_layer
    from topkphi.capture import capture_ids

    net = tiny_llama().to("cuda")
    fitter = PromptFitter(net, "torch", CFG, time_budget_s=5.0, n_features=8)
    assert fitter.opts.device == "cuda"
    layer = capture_ids(net, prompt(200), "torch")[1]
    opts = dataclasses.replace(fitter.opts, steps=20)
    on_gpu, on_cpu = fit_layer([layer], opts, 1), fit_layer([layer], dataclasses.replace(opts, device="cpu"), 1)
    assert on_gpu.steps == on_cpu.steps == 20
    assert on_gpu.loss_after == pytest.approx(on_cpu.loss_after, rel=1e-2)
    np.testing.assert_allclose(on_gpu.fmap.w_q, on_cpu.fmap.w_q, rtol=1e-2, atol=1e-3)
    engine = TorchEngine(net, DigitTokenizer(), fitter.fallback(), topkphi.get_backend("torch"), prompt_fitter=fitter)
    assert len(engine.generate(prompt(200), 4)) == 4 and engine.cfg(0).feature_map.kind == "learned"
