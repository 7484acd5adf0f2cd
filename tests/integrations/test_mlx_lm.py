"""mlx-lm integration on a tiny random Llama: exactness at full budget, routing only inside the block."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the mlx-lm integration needs mlx (pip install 'topkphi[mlx]')")
pytest.importorskip("mlx_lm", reason="the mlx-lm integration needs mlx-lm")

from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import RotatingKVCache  # noqa: E402
from mlx_lm.tokenizer_utils import TokenizerWrapper  # noqa: E402

import topkphi  # noqa: E402
from topkphi.generation.mlx_engine import MLXEngine  # noqa: E402
from topkphi.integrations.mlx_lm import TopKPhiKVCache, make_cache, topkphi_attention  # noqa: E402


def digit_tokenizer(vocab: int = 96) -> TokenizerWrapper:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=words))


def tiny_llama(seed: int = 0):
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=96, num_key_value_heads=2,
                           max_position_embeddings=2048, tie_word_embeddings=True)
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    return digit_tokenizer()


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(1).integers(0, 96, 260).tolist()


@pytest.mark.parametrize("selection", ["exact", "page"])
def test_full_budget_gives_dense_greedy_tokens(model, tokenizer, prompt, selection):
    dense = MLXEngine(model, tokenizer, None, None).generate(prompt, 24)
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=4096, selection=selection)
    engine = MLXEngine(model, tokenizer, cfg, topkphi.get_backend("mlx"))
    assert engine.generate(prompt, 24) == dense
    assert engine.stats.rho == 0.0 and engine.stats.read_fraction == pytest.approx(1.0)


def test_decode_steps_match_the_oracle(model, prompt):
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=24, selection="page", page_size=8)
    cache = make_cache(model, cfg, topkphi.get_backend("mlx"))
    seen = []
    original = TopKPhiKVCache.decode

    def spy(self, queries, keys, values, scale):
        out = original(self, queries, keys, values, scale)
        arrays = (queries[:, :, 0], keys, values, out[:, :, 0])
        as64 = [np.array(x.astype(mx.float32), dtype=np.float64) for x in arrays]
        seen.append((*as64, self.cfg))
        return out

    with topkphi_attention(model):
        TopKPhiKVCache.decode = spy
        try:
            model(mx.array([prompt]), cache=cache)
            mx.eval(model(mx.array([[5]]), cache=cache))
        finally:
            TopKPhiKVCache.decode = original
    assert len(seen) == 2
    oracle = topkphi.get_backend("numpy")
    for q, k, v, out, layer_cfg in seen:
        ref, stats = oracle.decode(q, k, v, oracle.build_summary(k, v, layer_cfg), layer_cfg)
        assert np.abs(stats.rho).max() > 0
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4


def test_routing_is_restored_on_exit(model):
    before = llama.scaled_dot_product_attention
    with topkphi_attention(model):
        assert llama.scaled_dot_product_attention is not before
    assert llama.scaled_dot_product_attention is before


def test_multi_turn_reuses_the_cache(model, tokenizer, prompt):
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=4096)
    engine = MLXEngine(model, tokenizer, cfg, topkphi.get_backend("mlx"))
    first = engine.generate(prompt, 6)
    turn2 = prompt + first + [3, 4, 5]
    list(engine.stream(turn2, max_tokens=6))
    assert engine.stats.prompt_tokens <= 4  # the new tokens (and the last reply token if it was not cached)
    assert engine.tokens[len(turn2):] == MLXEngine(model, tokenizer, None, None).generate(turn2, 6)


def test_rotating_caches_are_refused(model):
    class Sliding:
        layers = model.layers

        def make_cache(self):
            return [RotatingKVCache(max_size=64) for _ in model.layers]

    with pytest.raises(ValueError, match="full-attention KV caches only"):
        make_cache(Sliding(), topkphi.Config(), topkphi.get_backend("mlx"))
