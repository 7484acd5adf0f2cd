"""The vLLM integration's device-independent parts, without vLLM: paged layouts, the decode plan,
the side store and the decode loop over a simulated paged cache (torch only)."""

import pytest

torch = pytest.importorskip("torch")

import topkphi  # noqa: E402
from topkphi.integrations.vllm import engine_kwargs  # noqa: E402
from topkphi.integrations.vllm.options import VLLM_DEFAULT, VllmOptions  # noqa: E402
from topkphi.integrations.vllm.paged import PlainLayout, ProbedLayout, plan_decodes  # noqa: E402
from topkphi.integrations.vllm.store import PagedDecoder, SideMemory, SummaryStore  # noqa: E402

H, D = 2, 16


def transposed_writer(k, v, key_cache, value_cache, slots):
    """Keys stored [d, bs] per block and head (vLLM's vec CPU layout), values [bs, d]."""
    _, h, bs, d = key_cache.shape
    for i, s in enumerate(slots.tolist()):
        b, t = divmod(s, bs)
        key_cache[b].view(h, d, bs)[:, :, t] = k[i]
        value_cache[b, :, t] = v[i]


def paired_writer(k, v, key_cache, value_cache, slots):
    """A VNNI-like interleave for keys (token pairs share rows); values reversed and transposed."""
    _, h, bs, d = key_cache.shape
    for i, s in enumerate(slots.tolist()):
        b, t = divmod(s, bs)
        flat_k, flat_v = key_cache[b].view(h, bs * d), value_cache[b].view(h, bs * d)
        for j in range(d):
            flat_k[:, (t // 2) * 2 * d + j * 2 + t % 2] = k[i, :, j]
            flat_v[:, j * bs + (bs - 1 - t)] = v[i, :, j]


def write_through(writer, cache, k, v, slots):
    """``cache [nb,H,bs,2d]`` viewed and chunked as vLLM's CPU attention does."""
    nb, h, bs, two_d = cache.shape
    key_cache, value_cache = cache.view(nb, h, 2 * bs, two_d // 2).chunk(2, dim=2)
    writer(k, v, key_cache, value_cache, slots)


@pytest.mark.parametrize("writer", [transposed_writer, paired_writer])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probed_layout_reads_back_what_the_writer_stored(writer, dtype):
    bs, blocks = 8, torch.tensor([3, 0, 4])
    layout = ProbedLayout.probe(writer, bs, D, dtype)
    n = 2 * bs + 3
    k, v = torch.randn(n, H, D).to(dtype), torch.randn(n, H, D).to(dtype)
    pos = torch.arange(n)
    cache = torch.zeros(5, H, bs, 2 * D, dtype=dtype)
    write_through(writer, cache, k, v, blocks[pos // bs] * bs + pos % bs)
    gk, gv = layout.gather(cache, blocks, n)
    assert gk.shape == (1, H, n, D)
    assert torch.equal(gk[0], k.transpose(0, 1)) and torch.equal(gv[0], v.transpose(0, 1))


def test_probe_refuses_a_writer_that_loses_elements():
    def lossy(k, v, key_cache, value_cache, slots):
        key_cache[0, :, :, 0] = k[:, :, 0].T  # only element 0 of each key

    with pytest.raises(RuntimeError, match="cannot read this cache layout"):
        ProbedLayout.probe(lossy, 4, D, torch.float32)


def test_plain_layout_gathers_strided_caches():
    nb, bs, n = 4, 4, 11
    logical = torch.randn(nb, bs, H, 2 * D).permute(0, 2, 1, 3)  # physically NHD, logically [nb, H, bs, 2d]
    blocks = torch.tensor([2, 0, 3])
    k, v = PlainLayout().gather(logical, blocks, n)
    full = logical[blocks].permute(1, 0, 2, 3).reshape(H, -1, 2 * D)[:, :n]
    assert torch.equal(k[0], full[..., :D]) and torch.equal(v[0], full[..., D:])


def test_plan_takes_the_leading_one_token_rows():
    qsl = torch.tensor([0, 1, 2, 7])  # two decodes, then a 5-token prefill chunk
    seq_lens = torch.tensor([9, 4, 20])
    table = torch.tensor([[5, 6, 0], [7, 0, 0], [1, 2, 3]])
    slots = torch.tensor([6 * 8 + 0, 7 * 8 + 3, 2 * 8 + 3, 2 * 8 + 4, 2 * 8 + 5, 2 * 8 + 6, 2 * 8 + 7, -1])
    plan = plan_decodes(3, qsl, seq_lens, table, slots, block_size=8)
    assert [(r.token, r.n_tokens, r.blocks, r.key) for r in plan.rows] == [(0, 9, (5, 6), 6), (1, 4, (7,), 7)]
    assert plan.written == {6, 7, 2} and plan.n_tokens == 2 and plan.step == 3


def test_store_trusts_only_the_exact_continuation():
    store = SummaryStore(SideMemory(1 << 30))
    s = torch.zeros(4)
    store.put(6, s, 9, (5, 6), step=1)
    assert store.take(6, 10, (5, 6)) is None  # wrong length: dropped, not kept
    store.put(6, s, 9, (5, 6), step=1)
    assert store.take(6, 9, (4, 6, 7)) is None  # other blocks
    store.put(6, s, 9, (5, 6), step=1)
    assert store.take(6, 9, (5, 6, 8)) is s
    assert len(store) == 0 and store.memory.used == 0


def test_store_forgets_rewritten_blocks_and_stale_sequences():
    memory = SideMemory(1 << 30)
    store = SummaryStore(memory)
    for key, step in ((1, 1), (2, 2), (3, 3)):
        store.put(key, torch.zeros(8), 5, (key,), step)
    store.forget({3}, older_than=2)
    assert store.take(1, 5, (1,)) is None and store.take(3, 5, (3,)) is None
    assert store.take(2, 5, (2,)) is not None


def test_store_evicts_the_least_recent_over_its_cap():
    memory = SideMemory(100)
    store = SummaryStore(memory)
    store.put(1, torch.zeros(16), 5, (1,), 1)  # 64 bytes
    store.put(2, torch.zeros(16), 5, (2,), 2)
    assert len(store) == 1 and store.take(2, 5, (2,)) is not None and memory.peak == 128


def _sequence(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, n, D, generator=g), torch.randn(H, n, D, generator=g)


@pytest.mark.parametrize("selection", ["exact", "page"])
def test_decoder_matches_the_backend_on_interleaved_paged_sequences(selection):
    """Two sequences of different lengths decode together for 24 steps out of scattered blocks;
    each step equals the torch backend run on that sequence's contiguous cache."""
    bs, nb, steps = 8, 64, 24
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=24, selection=selection, page_size=8, feature_map="prf",
                         n_features=16, scale=D**-0.5)
    backend = topkphi.get_backend("torch")
    decoder = PagedDecoder(cfg, "torch", SideMemory(1 << 30))
    layout = ProbedLayout.probe(transposed_writer, bs, D, torch.float32)
    cache = torch.zeros(nb, H, bs, 2 * D)
    free = list(torch.randperm(nb, generator=torch.Generator().manual_seed(0)).tolist())
    seqs = {}
    for sid, (n0, seed) in enumerate(((70, 1), (29, 2))):
        k, v = _sequence(n0 + steps, seed)
        seqs[sid] = {"k": k, "v": v, "n": n0, "blocks": [free.pop() for _ in range(-(-(n0 + steps) // bs))]}
        pos = torch.arange(n0)
        slots = torch.tensor(seqs[sid]["blocks"])[pos // bs] * bs + pos % bs
        write_through(transposed_writer, cache, k[:, :n0].transpose(0, 1), v[:, :n0].transpose(0, 1), slots)
    reference = {}
    for step in range(1, steps + 1):
        slots = []
        for s in seqs.values():  # each sequence writes its next token, then decodes it
            t = s["n"]
            slot = s["blocks"][t // bs] * bs + t % bs
            write_through(transposed_writer, cache, s["k"][:, t : t + 1].transpose(0, 1),
                          s["v"][:, t : t + 1].transpose(0, 1), torch.tensor([slot]))
            s["n"] += 1
            slots.append(slot)
        lengths = [s["n"] for s in seqs.values()]
        width = max(len(s["blocks"]) for s in seqs.values())
        table = torch.tensor([s["blocks"] + [0] * (width - len(s["blocks"])) for s in seqs.values()])
        plan = plan_decodes(step, torch.tensor([0, 1, 2]), torch.tensor(lengths), table, torch.tensor(slots), bs)
        q = torch.randn(2, 2 * H, D)
        out = torch.zeros(2, 2 * H, D)
        decoder(q, cache, layout, plan, out)
        for sid, s in seqs.items():
            k, v = s["k"][None, :, : s["n"]], s["v"][None, :, : s["n"]]
            summary = reference.get(sid)
            summary = backend.build_summary(k, v, cfg) if summary is None else backend.append(summary, k, v, cfg)
            reference[sid] = summary
            expected, _ = backend.decode(q[sid : sid + 1], k, v, summary, cfg)
            torch.testing.assert_close(out[sid], expected[0], rtol=1e-5, atol=1e-5)
    assert decoder.counts.rows == 2 * steps and decoder.counts.rebuilt == 2  # one build each, then appends
    assert len(decoder.store) == 2 and decoder.counts.read_fraction_sum > 0


def test_decoder_is_dense_when_the_budget_covers_the_context():
    bs, n = 16, 50
    cfg = topkphi.Config(n_sink=4, n_tail=8, top_k=64, selection="page", page_size=16, scale=D**-0.5)
    decoder = PagedDecoder(cfg, "torch", SideMemory(1 << 30))
    k, v = _sequence(n, 3)
    cache = torch.zeros(8, H, bs, 2 * D)
    blocks = [6, 1, 4, 2]
    pos = torch.arange(n)
    slots = torch.tensor(blocks)[pos // bs] * bs + pos % bs
    write_through(transposed_writer, cache, k.transpose(0, 1), v.transpose(0, 1), slots)
    plan = plan_decodes(1, torch.tensor([0, 1]), torch.tensor([n]), torch.tensor([blocks]), slots[-1:], bs)
    q, out = torch.randn(1, 2 * H, D), torch.zeros(1, 2 * H, D)
    decoder(q, cache, ProbedLayout.probe(transposed_writer, bs, D, torch.float32), plan, out)
    dense = topkphi.get_backend("torch").dense(q, k[None], v[None])
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_options_round_trip_through_additional_config():
    cfg = topkphi.Config(top_k=128, selection="page", feature_map=None)
    kwargs = engine_kwargs(cfg, max_side_mib=64)
    assert kwargs["attention_backend"] == "CUSTOM"
    # selection and feature_map are the plugin's defaults (VLLM_DEFAULT), so they do not travel
    assert kwargs["additional_config"] == {"topkphi": {"top_k": 128, "backend": "auto", "max_side_mib": 64}}
    options = VllmOptions.from_additional_config(kwargs["additional_config"])
    assert options.config == cfg and options.max_side_bytes == 64 << 20
    assert VllmOptions.from_additional_config({}).config == VLLM_DEFAULT


@pytest.mark.parametrize("raw, match", [
    ({"top_k": 0}, "top_k"),
    ({"topk": 8}, "unknown topkphi option"),
    ({"scale": 0.1}, "unknown topkphi option"),
    ({"backend": "mlx"}, "backend"),
    ({"feature_map": "learned"}, "learned"),
])
def test_options_refuse_what_cannot_run(raw, match):
    with pytest.raises(ValueError, match=match):
        VllmOptions.from_dict(raw)
