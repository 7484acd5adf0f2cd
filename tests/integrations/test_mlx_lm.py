"""mlx-lm integration on a tiny random Llama: exactness at full budget, fitted summaries fitted from the
prefill's own query rows, routing only inside the block."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the mlx-lm integration needs mlx (pip install 'topkphi[mlx]')")
pytest.importorskip("mlx_lm", reason="the mlx-lm integration needs mlx-lm")

from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache  # noqa: E402
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


POLICIES = {  # selection and estimator of each tested policy
    "topk-prf": {"selection": "exact"},
    "page-prf": {"selection": "page"},
    "topk-cluster": {"selection": "exact", "feature_map": "cluster", "n_clusters": 8},
    "compact": {"selection": "compact", "feature_map": "compact", "page_size": 8},
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_full_budget_gives_dense_greedy_tokens(model, tokenizer, prompt, policy):
    dense = MLXEngine(model, tokenizer, None, None).generate(prompt, 24)
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=4096, **POLICIES[policy])
    engine = MLXEngine(model, tokenizer, cfg, topkphi.get_backend("mlx"))
    assert engine.generate(prompt, 24) == dense
    assert engine.stats.rho == 0.0 and engine.stats.read_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("policy", ["topk-cluster", "compact"])
def test_fitted_summaries_at_a_real_budget(model, tokenizer, prompt, policy):
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=32, fit_window=64, **POLICIES[policy])
    engine = MLXEngine(model, tokenizer, cfg, topkphi.get_backend("mlx"))
    outs = []
    original = TopKPhiKVCache.decode

    def spy(self, queries, keys, values, scale):
        outs.append(original(self, queries, keys, values, scale))
        return outs[-1]

    TopKPhiKVCache.decode = spy
    try:
        assert len(engine.generate(prompt, 8)) == 8
    finally:
        TopKPhiKVCache.decode = original
    assert len(outs) >= 2 * 8 and all(bool(mx.isfinite(out).all()) for out in outs)
    assert engine.stats.rho > 0.0 and engine.stats.read_fraction < 0.9


def eager_query_rows(model, chunks: list[list[int]]) -> list[np.ndarray]:
    """Each layer's post-RoPE query rows ``[1,Hq,N,d]`` over the chunks, recomputed from the attention
    modules' inputs (q_proj, then RoPE at the cache offset) rather than taken from the attention call."""
    rows: dict[int, list[np.ndarray]] = {}
    layer_of = {id(layer.self_attn): i for i, layer in enumerate(model.layers)}
    original = llama.Attention.__call__

    def record(self, x, mask=None, cache=None):
        q = self.q_proj(x).reshape(*x.shape[:2], self.n_heads, -1).transpose(0, 2, 1, 3)
        rows.setdefault(layer_of[id(self)], []).append(np.array(self.rope(q, offset=cache.offset)))
        return original(self, x, mask=mask, cache=cache)

    cache = make_prompt_cache(model)
    llama.Attention.__call__ = record
    try:
        for chunk in chunks:
            mx.eval(model(mx.array([chunk]), cache=cache))
    finally:
        llama.Attention.__call__ = original
    return [np.concatenate(rows[i], axis=2) for i in sorted(rows)]


@pytest.mark.parametrize("chunks", [[260], [250, 10], [20]], ids=["one", "chunked", "short"])
def test_reference_queries_are_the_prefills_last_query_rows(model, prompt, chunks):
    """The summary is fitted at the first decode step from the last fit_window rows of every prefill
    chunk, equal to the model's own post-RoPE queries; a later chat turn folds, never refits."""
    cfg = topkphi.Config(selection="exact", n_sink=4, n_tail=16, top_k=32, feature_map="cluster", n_clusters=8,
                         fit_window=32)
    backend = topkphi.get_backend("mlx")
    fits = []
    build = backend.build_summary

    def spy(k, v, layer_cfg, queries=None):
        fits.append((k.shape[2], queries))
        return build(k, v, layer_cfg, queries=queries)

    backend.build_summary = spy
    cache = make_cache(model, cfg, backend)
    ids = [prompt[sum(chunks[:i]):sum(chunks[: i + 1])] for i in range(len(chunks))]
    with topkphi_attention(model):
        for chunk in ids:
            mx.eval(model(mx.array([chunk]), cache=cache))
        assert fits == []  # nothing is fitted before decoding starts
        for chunk in ([5], [6, 7, 8], [9]):  # a decode step, a chat turn (folded), a decode step
            mx.eval(model(mx.array([chunk]), cache=cache))
    n_prefill = sum(chunks)
    window = min(32, n_prefill)
    expected = eager_query_rows(model, ids)
    assert len(fits) == len(expected) == 2  # one fit per layer, at the first decode step
    for (n_tokens, queries), rows in zip(fits, expected):
        assert n_tokens == n_prefill + 1 and queries.end == n_prefill
        assert queries.q.shape == (1, 4, window, 16)
        np.testing.assert_allclose(np.array(queries.q), rows[:, :, -window:], rtol=1e-5, atol=1e-5)
    for layer in cache:
        assert layer.summary.n_tokens == n_prefill + 5 and layer.reference.rows is None


def test_decode_steps_match_the_oracle(model, prompt):
    cfg = topkphi.Config(feature_map="prf", n_sink=4, n_tail=16, top_k=24, selection="page", page_size=8)
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


@pytest.mark.parametrize("policy", ["topk-prf", "compact"])
def test_multi_turn_reuses_the_cache(model, tokenizer, prompt, policy):
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=4096, **POLICIES[policy])
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
        make_cache(Sliding(), topkphi.Config(selection="exact", feature_map="prf"), topkphi.get_backend("mlx"))
