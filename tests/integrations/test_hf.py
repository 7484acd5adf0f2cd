"""HF transformers integration on a tiny random Llama: exactness at full budget, fitted summaries fitted
from the prefill's own query rows, clean enable/disable."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the HF integration needs torch (pip install 'topkphi[torch]')")
transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")

import topkphi  # noqa: E402
from topkphi.generation.torch_engine import TorchEngine  # noqa: E402
from topkphi.integrations import hf  # noqa: E402
from topkphi.integrations.hf import TopKPhiCache, TopKPhiLayer, cache_kwargs, topkphi_attention  # noqa: E402


class DigitTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tiny_llama(seed: int = 0, heads: int = 4, kv_heads: int = 2):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 96, (260,), generator=torch.Generator().manual_seed(1)).tolist()


POLICIES = {  # selection and estimator of each tested policy
    "topk-prf": {"selection": "exact"},
    "page-prf": {"selection": "page"},
    "topk-cluster": {"selection": "exact", "feature_map": "cluster", "n_clusters": 8},
    "compact": {"selection": "compact", "feature_map": "compact", "page_size": 8},
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_full_budget_gives_dense_greedy_tokens(model, prompt, policy):
    dense = TorchEngine(model, DigitTokenizer(), None, None).generate(prompt, 24)
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=4096, **POLICIES[policy])
    engine = TorchEngine(model, DigitTokenizer(), cfg, topkphi.get_backend("torch"))
    assert engine.generate(prompt, 24) == dense
    assert engine.stats.rho == 0.0 and engine.stats.read_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("policy", ["topk-cluster", "compact"])
def test_fitted_summaries_at_a_real_budget(model, prompt, policy):
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=32, fit_window=64, **POLICIES[policy])
    engine = TorchEngine(model, DigitTokenizer(), cfg, topkphi.get_backend("torch"))
    outs = []
    original = TopKPhiLayer.decode

    def spy(self, query, keys, values):
        outs.append(original(self, query, keys, values))
        return outs[-1]

    TopKPhiLayer.decode = spy
    try:
        assert len(engine.generate(prompt, 8)) == 8
    finally:
        TopKPhiLayer.decode = original
    assert len(outs) == 2 * 7 and all(bool(torch.isfinite(out).all()) for out in outs)
    assert engine.stats.rho > 0.0 and engine.stats.read_fraction < 0.9


def eager_query_rows(model, chunks: list[list[int]]) -> list[torch.Tensor]:
    """Each layer's post-RoPE query rows ``[1,Hq,N,d]`` over the chunks, recomputed from the attention
    modules' inputs (q_proj, then RoPE) rather than taken from the attention function."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rows: dict[int, list[torch.Tensor]] = {}

    def record(module, args, kwargs):
        h = kwargs["hidden_states"]
        q = module.q_proj(h).view(*h.shape[:-1], -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        rows.setdefault(module.layer_idx, []).append(apply_rotary_pos_emb(q, q, cos, sin)[0])

    hooks = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in model.model.layers]
    cache = transformers.DynamicCache(config=model.config)
    try:
        with torch.inference_mode():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]), **cache_kwargs(model, cache))
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(rows[i], dim=2) for i in sorted(rows)]


@pytest.mark.parametrize("chunks", [[260], [250, 10], [20]], ids=["one", "chunked", "short"])
def test_reference_queries_are_the_prefills_last_query_rows(model, prompt, chunks):
    """The summary is fitted at the first decode step from the last fit_window rows of every prefill
    chunk, equal to the model's own post-RoPE queries; a later chat turn folds, never refits."""
    cfg = topkphi.Config(selection="exact", n_sink=4, n_tail=16, top_k=32, feature_map="cluster", n_clusters=8,
                         fit_window=32)
    backend = topkphi.get_backend("torch")
    fits = []
    build = backend.build_summary

    def spy(k, v, layer_cfg, queries=None):
        fits.append((k.shape[2], queries))
        return build(k, v, layer_cfg, queries=queries)

    backend.build_summary = spy
    cache = TopKPhiCache(model, cfg, backend)
    ids = [prompt[sum(chunks[:i]):sum(chunks[: i + 1])] for i in range(len(chunks))]
    with torch.inference_mode(), topkphi_attention(model):
        for chunk in ids:
            model(input_ids=torch.tensor([chunk]), **cache_kwargs(model, cache))
        assert fits == []  # nothing is fitted before decoding starts
        model(input_ids=torch.tensor([[5]]), **cache_kwargs(model, cache))
        model(input_ids=torch.tensor([[6, 7, 8]]), **cache_kwargs(model, cache))  # a chat turn: folded
        model(input_ids=torch.tensor([[9]]), **cache_kwargs(model, cache))
    n_prefill = sum(chunks)
    window = min(32, n_prefill)
    expected = eager_query_rows(model, ids)
    assert len(fits) == len(expected) == 2  # one fit per layer, at the first decode step
    for (n_tokens, queries), rows in zip(fits, expected):
        assert n_tokens == n_prefill + 1 and queries.end == n_prefill
        assert queries.q.shape == (1, 4, window, 16)
        torch.testing.assert_close(queries.q, rows[:, :, -window:], rtol=1e-5, atol=1e-5)
    for layer in cache.layers:
        assert layer.summary.n_tokens == n_prefill + 5 and layer.reference.rows is None


def test_decode_steps_match_the_oracle(model, prompt):
    """A small budget really runs topkphi: each layer's decode equals the oracle on the same cache."""
    cfg = topkphi.Config(feature_map="prf", n_sink=4, n_tail=16, top_k=24, selection="page", page_size=8)
    cache = TopKPhiCache(model, cfg, topkphi.get_backend("torch"))
    seen = []
    original = TopKPhiLayer.decode

    def spy(self, query, keys, values):
        out = original(self, query, keys, values)
        seen.append((query.double().numpy(), keys.double().numpy(), values.double().numpy(), self.cfg,
                     out.double().numpy()))
        return out

    oracle = topkphi.get_backend("numpy")
    with torch.inference_mode(), topkphi_attention(model):
        TopKPhiLayer.decode = spy
        try:
            model(input_ids=torch.tensor([prompt]), **cache_kwargs(model, cache))
            model(input_ids=torch.tensor([[5]]), **cache_kwargs(model, cache))
        finally:
            TopKPhiLayer.decode = original
    assert len(seen) == 2  # one decode per layer
    for q, k, v, layer_cfg, out in seen:
        summary = oracle.build_summary(k, v, layer_cfg)
        ref, stats = oracle.decode(q, k, v, summary, layer_cfg)
        assert abs(stats.rho).max() > 0  # the completion took part
        assert float(((out - ref) ** 2).sum() ** 0.5 / (ref**2).sum() ** 0.5) < 1e-4


def test_summary_is_folded_incrementally(model, prompt):
    cfg = topkphi.Config(selection="exact", feature_map="prf", n_sink=4, n_tail=16, top_k=32)
    engine = TorchEngine(model, DigitTokenizer(), cfg, topkphi.get_backend("torch"))
    engine.generate(prompt, 8)
    layer = engine.cache.layers[0]
    assert layer.summary.n_tokens == layer.get_seq_length() == len(prompt) + 7  # the reply but its last token
    assert layer.summary.mid_end == layer.get_seq_length() - 16


@pytest.mark.parametrize("policy", ["topk-prf", "compact"])
def test_multi_turn_reuses_and_crops_the_cache(model, prompt, policy):
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=4096, **POLICIES[policy])
    engine = TorchEngine(model, DigitTokenizer(), cfg, topkphi.get_backend("torch"))
    first = engine.generate(prompt, 6)
    turn2 = prompt + first + [3, 4, 5]
    list(engine.stream(turn2, max_tokens=6))
    assert engine.stats.prompt_tokens == 4  # only the new tokens and the last reply token ran
    fresh = TorchEngine(model, DigitTokenizer(), None, None).generate(turn2, 6)
    assert engine.tokens[len(turn2):] == fresh
    edited = prompt[:100] + [7, 7]  # diverges inside the cache: crop, rebuild the summary
    list(engine.stream(edited, max_tokens=4))
    assert engine.stats.prompt_tokens == 2
    assert engine.tokens[len(edited):] == TorchEngine(model, DigitTokenizer(), None, None).generate(edited, 4)


def test_captured_layers_give_the_reference_queries_a_cache_fits_from(model, prompt):
    from topkphi.capture import capture_torch

    layers = capture_torch(model, torch.tensor([prompt[:200]]), n_queries=64)  # positions 136..199
    for capture, rows in zip(layers, eager_query_rows(model, [prompt[:200]])):
        queries = capture.reference_queries(end=180, window=32)
        assert queries.end == 180 and queries.q.shape == (1, 4, 32, 16)
        np.testing.assert_allclose(queries.q, rows[:, :, 148:180].numpy(), rtol=1e-5, atol=1e-5)
        assert capture.reference_queries(end=160, window=64).window == 24  # only the captured rows
    with pytest.raises(ValueError, match="were not captured"):
        layers[0].reference_queries(end=136, window=32)


def test_the_cache_layer_holds_the_state(model, prompt):
    """The attention function finds its layer through the cache update, not a tensor attribute."""
    cache = TopKPhiCache(model, topkphi.Config(selection="exact", feature_map="prf", n_sink=4, n_tail=16, top_k=24),
                         topkphi.get_backend("torch"))
    with torch.inference_mode(), topkphi_attention(model):
        model(input_ids=torch.tensor([prompt[:40]]), **cache_kwargs(model, cache))
    layer = cache.layers[0]
    assert not hasattr(layer.keys, "topkphi_layer") and layer.summary.n_tokens == 40
    assert hf._updated_layer(layer.keys) is None  # taken by the attention call that followed update


def test_enable_and_disable_leave_no_trace(prompt):
    a, b = tiny_llama(1), tiny_llama(2)
    before = (a.config._attn_implementation, b.config._attn_implementation)
    with topkphi_attention(a):
        assert a.config._attn_implementation == "topkphi"
        assert b.config._attn_implementation == before[1]  # the other model is untouched
    assert (a.config._attn_implementation, b.config._attn_implementation) == before
    # a plain cache under topkphi routing is exact attention
    with torch.inference_mode():
        ids = torch.tensor([prompt[:50]])
        ref = a(input_ids=ids).logits
        with topkphi_attention(a):
            got = a(input_ids=ids, **cache_kwargs(a, transformers.DynamicCache(config=a.config))).logits
    torch.testing.assert_close(got, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton page path needs a CUDA GPU")
def test_triton_engine_on_cuda_chained_and_plain_launches_agree(prompt):
    """The whole chat loop on the GPU (bf16, Triton page path with small budgets, every decode step's
    kernels chained where the GPU allows it) gives the same tokens and statistics as plain launches,
    and the full budget (fp32) still gives dense's tokens. Kernel errors raise (no fallback)."""
    from topkphi.backends.triton_backend import TritonPath, TritonTuning

    model = tiny_llama(3).to("cuda", torch.bfloat16)
    cfg = topkphi.Config(feature_map="prf", n_sink=4, n_tail=16, top_k=24, selection="page", page_size=8)
    runs = {}
    for chain in (False, True):
        backend = topkphi.get_backend("triton", tuning=TritonTuning(chain_launches=chain))
        engine = TorchEngine(model, DigitTokenizer(), cfg, backend)
        runs[chain] = (engine.generate(prompt, 16), engine.stats.rho, engine.stats.read_fraction)
        assert backend.last_path == TritonPath("triton", "triton")
    assert runs[False] == runs[True]
    assert 0.0 < runs[True][1] and runs[True][2] < 0.9  # the completion ran on a partial read set
    model = model.float()  # fp32, so that exact attention and dense agree to the last greedy token
    dense = TorchEngine(model, DigitTokenizer(), None, None).generate(prompt, 16)
    full = topkphi.Config(feature_map="prf", n_sink=4, n_tail=16, top_k=4096, selection="page")
    assert TorchEngine(model, DigitTokenizer(), full, topkphi.get_backend("triton")).generate(prompt, 16) == dense
