"""The fast scoring path against the slow reference; blocking, bucketing, block sizes; `make bench` smoke test.

No timings here (the machine is shared): speed is measured by `make bench`, correctness is tested here.
"""

import pytest
import torch

from zoo.blocks import cross_attention_similarity, reference_scoring
from zoo.blocks.attention import use_reference
from zoo.blocks.fast_attention import cross_attention_similarity as fast_similarity
from zoo.blocks.fast_attention import length_groups
from zoo.blocks.functional import SCORE_NORMS
from zoo.engine.evaluation import auto_blocks, pair_cost, score_blockwise

LENGTHS = [8, 3, 5, 5, 1, 8, 2, 3, 3, 7]


def _batch(n_img=4, regions=5, d=6, lengths=LENGTHS, dtype=torch.float64, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths)
    images = torch.randn(n_img, regions, d, generator=g, dtype=dtype)
    captions = torch.randn(len(lengths), int(lengths.max()) + 1, d, generator=g, dtype=dtype) * 1.3
    captions[torch.arange(captions.shape[1])[None] >= lengths[:, None]] = 7.0  # garbage in padding must not matter
    if zeros:
        images[0, 2] = 0.0  # an empty region
        captions[1, 1] = 0.0  # a zero word vector
    return images, captions, lengths


def _both(images, captions, lengths, reference, **kw):
    return cross_attention_similarity(images, captions, lengths, reference=reference, **kw)


@pytest.mark.parametrize("norm", SCORE_NORMS)
@pytest.mark.parametrize("agg", ["mean", "lse"])
def test_fast_equals_reference_float64_every_norm_and_pooling(norm, agg):
    images, captions, lengths = _batch()
    ref = _both(images, captions, lengths, True, norm=norm, agg=agg)
    fast = _both(images, captions, lengths, False, norm=norm, agg=agg)
    assert set(fast) == {"i2t", "t2i"}
    for k in ref:
        assert fast[k].shape == (4, len(LENGTHS)) and fast[k].dtype == ref[k].dtype
        assert torch.allclose(fast[k], ref[k], atol=1e-12, rtol=0), (k, (fast[k] - ref[k]).abs().max())
    assert not torch.allclose(fast["i2t"], fast["t2i"])  # the two directions really differ


@pytest.mark.parametrize("norm", ["clipped_l2", "relu_l2", "l2", "l1", "softmax", "none"])
@pytest.mark.parametrize("agg", ["mean", "lse"])
@pytest.mark.parametrize("directions", [(True, True), (True, False), (False, True)])
def test_fast_gradients_equal_reference_float64(norm, agg, directions):
    """l2-family norms run the hand-written backward; the others autograd through the fast forward."""
    i2t, t2i = directions
    images0, captions0, lengths = _batch()
    weights = torch.randn(4, len(LENGTHS), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for reference in (True, False):
        images, captions = images0.clone().requires_grad_(), captions0.clone().requires_grad_()
        out = _both(images, captions, lengths, reference, norm=norm, agg=agg, i2t=i2t, t2i=t2i)
        assert set(out) == {k for k, on in (("i2t", i2t), ("t2i", t2i)) if on}
        sum((v * weights * (1.0 if k == "i2t" else 0.7)).sum() for k, v in out.items()).backward()
        grads.append((images.grad, captions.grad))
    for ref, fast in zip(*grads):
        assert torch.isfinite(fast).all()
        assert torch.allclose(fast, ref, atol=1e-12, rtol=0), (fast - ref).abs().max()
    pad = torch.arange(captions0.shape[1])[None] >= lengths[:, None]
    assert (grads[1][1][pad] == 0).all()  # padding gets no gradient


def test_fast_equals_reference_float32_within_1e5_at_working_size():
    images, captions, lengths = _batch(n_img=6, regions=36, d=128, dtype=torch.float32, zeros=False,
                                       lengths=torch.randint(1, 25, (40,), generator=torch.Generator().manual_seed(2)))
    images = torch.nn.functional.normalize(images, dim=-1)
    for agg in ("mean", "lse"):
        ref = _both(images, captions, lengths, True, agg=agg)
        fast = _both(images, captions, lengths, False, agg=agg)
        for k in ref:
            assert (fast[k] - ref[k]).abs().max() <= 1e-5


def test_fast_equals_reference_bf16_autocast_within_1e3():
    images, captions, lengths = _batch(n_img=5, regions=36, d=64, dtype=torch.float32, zeros=False,
                                       lengths=[12, 9, 14, 6, 30, 12, 12, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _both(images, captions, lengths, True)
        fast = _both(images, captions, lengths, False)
    ref32 = _both(images, captions, lengths, True)
    for k in ref:
        assert fast[k].dtype == torch.float32  # everything after the contraction is float32
        assert (fast[k] - ref[k]).abs().max() <= 1e-3
        assert (fast[k] - ref32[k]).abs().max() <= 3e-2  # bf16 rounding of the cosines themselves


@pytest.mark.parametrize("chunk", [1, 37, 200, 10**9, 0])
def test_chunked_evaluation_equals_one_piece(chunk):
    """Image/caption chunking (cache-sized working sets) and splitting long length groups change nothing."""
    images, captions, lengths = _batch(n_img=7, lengths=[4] * 13 + [2, 6, 6, 1])
    whole = fast_similarity(images, captions, lengths, chunk_elements=0)
    with torch.no_grad():
        got = fast_similarity(images, captions, lengths, chunk_elements=chunk)
    for k in whole:
        assert torch.allclose(got[k], whole[k], atol=1e-13, rtol=0)


def test_length_groups_cover_every_caption_once_longest_first():
    lengths = torch.tensor([3, 1, 3, 7, 1, 1, 2])
    order, groups = length_groups(lengths)
    assert [l for _, _, l in groups] == [7, 3, 2, 1]
    assert sorted(order.tolist()) == list(range(7))
    for start, n, l in groups:
        assert (lengths[order[start : start + n]] == l).all()
    assert sum(n for _, n, _ in groups) == 7
    with pytest.raises(ValueError, match="at least one word"):
        length_groups(torch.tensor([2, 0]))


def test_bad_arguments_are_reported():
    images, captions, lengths = _batch()
    with pytest.raises(ValueError, match="score normalisation"):
        fast_similarity(images, captions, lengths, norm="l3")
    with pytest.raises(ValueError, match="aggregation"):
        fast_similarity(images, captions, lengths, agg="max")
    with pytest.raises(ValueError, match="expected images"):
        fast_similarity(images[0], captions, lengths)


def test_reference_switch_context_and_environment(monkeypatch):
    assert not use_reference()
    with reference_scoring():
        assert use_reference()
        with reference_scoring(False):
            assert use_reference()
    assert not use_reference()
    monkeypatch.setenv("ZOO_REFERENCE_SCORING", "1")
    assert use_reference()


def _method(**kw):
    from zoo.methods import CASCBase

    torch.manual_seed(0)
    return CASCBase(vocab_size=20, feature_dim=8, embed_dim=16, word_dim=8, fold_size=None, **kw).double().eval()


@pytest.mark.parametrize("ib,cb", [(1, 1), (2, 3), (3, 7), (100, 100), (0, 0)])
def test_bucketed_blockwise_scoring_equals_unblocked_reference(ib, cb):
    """score_blockwise (length-sorted captions, trimmed blocks, fast bucketed scorer) vs one unblocked reference call."""
    model = _method(direction="both", aggregation="lse")
    images, captions, lengths = _batch(n_img=5, d=16)
    img, cap = {"regions": images}, {"words": captions, "lengths": lengths}
    with torch.no_grad():
        with reference_scoring():
            direct = model.score(img, cap)
        blocked = score_blockwise(model.score, img, cap, ib, cb)
    assert blocked.shape == (5, len(LENGTHS))
    assert torch.allclose(blocked, direct.float(), atol=1e-6)


def test_auto_blocks_fit_memory_and_cap():
    gib = 2**30
    regions = torch.empty(5000, 36, 1, dtype=torch.bfloat16).expand(5000, 36, 1024)  # COCO-5K shapes, no memory
    words = torch.empty(25000, 1, 1).expand(25000, 40, 1024)
    lengths = torch.full((25000,), 13)
    img, cap = {"regions": regions}, {"words": words, "lengths": lengths}
    per_pair = pair_cost(img, cap) * 4 * 8
    assert pair_cost(img, cap) == 36 * 13
    allocated = 3 * gib  # embeddings already on the card
    result = 5000 * 25000 * 4 * 2
    per_cap, per_img = 3 * 13 * 1024 * 4, 3 * 36 * 1024 * 4  # packed/unit copies of the block's inputs
    for free in (80 * gib, 20 * gib, 2 * gib):
        ib, cb = auto_blocks(img, cap, "cuda", free_bytes=free, allocated_bytes=allocated)
        block = ib * cb * per_pair + cb * per_cap + ib * per_img
        assert block <= 0.8 * free
        assert allocated + result + block <= 16 * gib  # the COCO-5K evaluation stays under 16 GB
        assert 1 <= ib <= 5000 and 1 <= cb <= 25000
    big = auto_blocks(img, cap, "cuda", free_bytes=80 * gib, allocated_bytes=allocated)
    small = auto_blocks(img, cap, "cuda", free_bytes=2 * gib, allocated_bytes=allocated)
    assert big[0] * big[1] > 4 * small[0] * small[1]  # blocks grow with free memory, up to the cap
    assert auto_blocks(img, cap, "cuda", free_bytes=1000, allocated_bytes=0) == (1, 1)  # never zero
    # CPU: a fixed working set
    ib, cb = auto_blocks({"regions": torch.zeros(50, 36, 4)}, {"words": torch.zeros(250, 20, 4),
                                                              "lengths": torch.full((250,), 12)}, "cpu")
    assert (ib, cb) == (50, 250)
    # global vectors (no per-pair tensor): every pair costs one element
    assert pair_cost({"v": torch.zeros(3, 4)}, {"t": torch.zeros(5, 4)}) == 1


@pytest.mark.parametrize("method", ["casc_base", "casc", "cccl"])
def test_recall_fast_equals_reference_on_synthscenes(tmp_path, method):
    """A briefly trained model of each method: R@K from the fast path equal to the reference's within 0.1."""
    from datamodules import SynthScenesDataModule
    from zoo.engine.evaluation import cat_embeddings
    from zoo.methods import CASC, CCCL, CASCBase

    extra = {"casc_base": {}, "casc": {"with_labels": True},
             "cccl": {"with_boxes": True, "with_graphs": True, "parser": "spacy"}}[method]
    dm = SynthScenesDataModule(str(tmp_path / "s"), n_train=40, n_dev=5, n_test=20, num_regions=12, feature_dim=32,
                               batch_size=20, eval_batch_size=20, num_workers=0, vocab_min_count=1, **extra)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    common = dict(vocab_size=dm.vocab_size, feature_dim=32, embed_dim=16, word_dim=16, fold_size=None,
                  eval_image_block=7, eval_caption_block=11)
    if method == "casc_base":
        model = CASCBase(**common)
    elif method == "casc":
        model = CASC(**common)
    else:
        model = CCCL(**common, sim_dim=8, text_encoder="bigru")
    model.configure_from_data(dm)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(2):
        for batch in dm.train_dataloader():
            opt.zero_grad()
            loss = sum(model.training_losses(batch, model.encode_images(batch), model.encode_captions(batch)).values())
            loss.backward()
            opt.step()
    dm.setup("test")
    model.eval()
    with torch.no_grad():
        chunks = [(model.encode_images(b), model.encode_captions(b), b["image_ids"], b["caption_ids"])
                  for b in dm.test_dataloader()]
    img, cap = cat_embeddings([c[0] for c in chunks]), cat_embeddings([c[1] for c in chunks])
    ids = torch.cat([c[2] for c in chunks]), torch.cat([c[3] for c in chunks])
    fast = model.evaluate_embeddings(img, cap, *ids, n_images=20)
    with reference_scoring():
        ref = model.evaluate_embeddings(img, cap, *ids, n_images=20)
    assert fast["all"]["rsum"] > 0
    for k, v in ref["all"].items():
        assert fast["all"][k] == pytest.approx(v, abs=0.1), k


def test_bench_runs_and_prints_ratios(capsys):
    from zoo.bench import methods as bench

    bench.main(["--images", "3", "--train-batch", "4", "--dim", "16", "--vocab", "30", "--repeats", "1"])
    out = capsys.readouterr().out
    table = out[out.rindex("method "):]  # the summary table
    names = [spec.name for spec in bench.BENCHES.values()]
    assert {"casc_base", "casc", "cccl", "vse_infinity", "vsepp", "sgraf"} <= set(names)
    for method in names:  # every registered method, fast and reference, eval and train
        for what in ("eval  fast", "eval  reference", "train fast", "train reference"):
            assert any(line.startswith(f"{method} ") and what in line for line in table.splitlines()), (method, what)
    for what in ("pairs/s", "ms/step", "x  "):
        assert what in table, what
    diffs = [float(part.split(")")[0]) for part in table.split("max |fast-ref| ")[1:]]
    assert len(diffs) == 2 * len(names) and max(diffs) < 1e-4  # the two paths scored the same grid alike


def test_bench_registry_is_by_method_class():
    from zoo import bench
    from zoo.methods import CASCBase

    assert isinstance(bench.BENCHES[CASCBase], bench.CASCBaseBench)

    class Toy(CASCBase):
        pass

    @bench.register_bench(Toy)
    class ToyBench(bench.CASCBaseBench):
        name = "toy"

    try:
        assert bench.BENCHES[Toy].name == "toy"
    finally:
        del bench.BENCHES[Toy]


def test_text_encoder_gather_equals_pad_packed_sequence():
    """BiGRUTextEncoder places packed rows with one gather; the reference is pad_packed_sequence (values and grads)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from zoo.blocks import BiGRUTextEncoder
    from zoo.blocks.functional import l2_normalize

    torch.manual_seed(0)
    enc = BiGRUTextEncoder(50, 8, 16).double()
    lengths = torch.tensor([5, 2, 7, 7, 1, 3])
    tokens = torch.randint(1, 50, (6, 9))  # total length 9 > longest caption 7: trailing all-padding columns
    tokens[torch.arange(9)[None] >= lengths[:, None]] = 0

    def reference():
        packed = pack_padded_sequence(enc.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(enc.rnn(packed)[0], batch_first=True, total_length=9)
        return l2_normalize((out[..., :16] + out[..., 16:]) / 2)

    weights = torch.rand(16, dtype=torch.float64)
    got, ref = enc(tokens, lengths), reference()
    with reference_scoring():
        assert torch.equal(enc(tokens, lengths), ref)  # the switch restores the old placement
    assert got.shape == (6, 9, 16) and torch.allclose(got, ref, atol=1e-14)
    assert (got[torch.arange(9)[None] >= lengths[:, None]] == 0).all()
    g_got = torch.autograd.grad((got ** 2 * weights).sum(), list(enc.parameters()))
    g_ref = torch.autograd.grad((ref ** 2 * weights).sum(), list(enc.parameters()))
    for a, b in zip(g_got, g_ref):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_gru_direction_backward_passes_gradcheck(reverse):
    """The hand-written GRU backward (one recurrent-weight product for all steps) against finite differences,
    with sequences ending at different steps (packed batch sizes 4, 4, 3, 1)."""
    from zoo.blocks.encoders import _GRUDirection

    g = torch.Generator().manual_seed(0)
    h = 3
    batch_sizes = [4, 4, 3, 1]
    gi = torch.randn(sum(batch_sizes), 3 * h, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(3 * h, h, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(3 * h, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: _GRUDirection.apply(a, c, d, batch_sizes, reverse), (gi, w, b))


def test_fused_backward_in_image_slabs_equals_reference(monkeypatch):
    """The hand-written backward walks images in cache-sized slabs; one image per slab here."""
    from zoo.blocks import fast_attention

    monkeypatch.setattr(fast_attention, "CPU_CHUNK_ELEMENTS", 1)
    images0, captions0, lengths = _batch(n_img=5)
    grads = []
    for reference in (True, False):
        images, captions = images0.clone().requires_grad_(), captions0.clone().requires_grad_()
        out = _both(images, captions, lengths, reference, agg="lse")
        (out["i2t"].sum() + 0.3 * out["t2i"].pow(2).sum()).backward()
        grads.append((images.grad, captions.grad))
    for ref, fast in zip(*grads):
        assert torch.allclose(fast, ref, atol=1e-12, rtol=0)


def test_trim_padding_never_cuts_a_per_caption_vector():
    """A [C, d] vector whose width equals the longest caption length used to be cut to the block's longest."""
    from zoo.engine.evaluation import trim_padding

    cap = {"words": torch.randn(3, 6, 4), "lengths": torch.tensor([3, 2, 3]), "global": torch.randn(3, 6),
           "mask": torch.ones(3, 6, dtype=torch.bool), "graph": torch.ones(3, 6, 6)}
    out = trim_padding(cap)
    assert out["words"].shape == (3, 3, 4) and out["mask"].shape == (3, 3) and out["graph"].shape == (3, 3, 3)
    assert out["global"].shape == (3, 6)


def test_per_direction_pooling_fast_equals_reference():
    """The released CASC code pools I2T with LogSumExp and T2I with the mean."""
    g = torch.Generator().manual_seed(0)
    img, cap = torch.randn(3, 5, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    lengths = torch.tensor([6, 2, 4, 3])
    kw = dict(lambda_i2t=4.0, lambda_t2i=9.0, agg="mean", agg_i2t="lse", agg_t2i="mean")
    ref = cross_attention_similarity(img, cap, lengths, reference=True, **kw)
    fast = cross_attention_similarity(img, cap, lengths, reference=False, **kw)
    mean_only = cross_attention_similarity(img, cap, lengths, reference=True, lambda_i2t=4.0, lambda_t2i=9.0)
    for k in ("i2t", "t2i"):
        assert torch.allclose(ref[k], fast[k], atol=1e-5)
    assert not torch.allclose(ref["i2t"], mean_only["i2t"])  # the override took effect


@pytest.mark.parametrize("norm", [n for n in SCORE_NORMS if n != "softmax"])
@pytest.mark.parametrize("chunk", [None, 0, 37])
def test_global_weights_from_the_fast_scorer_equal_eq10_reference(norm, chunk):
    """CASC Eq. (10)'s weights as a by-product of the fast scorer (S_G reading (a) without a second contraction)
    equal attention.block_global_weights on the padded block, in the chunked and the whole-block paths."""
    images, captions, lengths = _batch()
    kw = dict(norm=norm, lambda_i2t=4.0, lambda_t2i=9.0, agg_i2t="lse")
    with torch.no_grad():
        ref = _both(images, captions, lengths, True, global_weights=True, **kw)
        fast = fast_similarity(images, captions, lengths, chunk_elements=chunk, global_weights=True, **kw)
    assert set(fast) == set(ref) == {"i2t", "t2i", "w_regions", "w_words"}
    for k in ref:
        assert fast[k].shape == ref[k].shape, k
        assert torch.allclose(fast[k], ref[k].to(fast[k].dtype), atol=1e-12, rtol=0), k
    pad = torch.arange(captions.shape[1])[None] >= lengths[:, None]
    assert (fast["w_words"][:, pad] == 0).all()
    ones = torch.ones(images.shape[0], len(lengths), dtype=torch.float64)
    assert torch.allclose(fast["w_words"].sum(-1), ones) and torch.allclose(fast["w_regions"].sum(-1), ones)


def test_global_weights_bad_requests_are_reported():
    images, captions, lengths = _batch(dtype=torch.float32)
    with pytest.raises(ValueError, match="both attention directions"):
        fast_similarity(images, captions, lengths, t2i=False, global_weights=True)
    with pytest.raises(ValueError, match="evaluation-only"):
        fast_similarity(images.requires_grad_(), captions, lengths, global_weights=True)


def test_in_order_embeddings_are_not_copied_and_shuffled_ones_are_ordered():
    """Evaluation memory: one process with an unshuffled loader keeps its embeddings as they are (no copy);
    ids out of order are still sorted, and missing or out-of-range ids are errors."""
    from zoo.engine.evaluation import gather_and_order

    emb = {"words": torch.randn(5, 3, 2), "lengths": torch.tensor([3, 1, 2, 2, 3])}
    same = gather_and_order(emb, torch.arange(5), 5, "captions")
    assert all(same[k] is emb[k] for k in emb)
    perm = torch.tensor([2, 0, 4, 1, 3])
    ordered = gather_and_order({k: v[perm] for k, v in emb.items()}, perm, 5, "captions")
    assert all(torch.equal(ordered[k], emb[k]) for k in emb)
    with pytest.raises(RuntimeError, match="saw only 4 of 5 captions"):
        gather_and_order({k: v[:4] for k, v in emb.items()}, torch.arange(4), 5, "captions")
    with pytest.raises(RuntimeError, match="out of range"):
        gather_and_order(emb, torch.arange(5) + 1, 5, "captions")


def test_bench_memory_runs_and_prints_the_ratio(capsys):
    from zoo.bench import memory as bench_memory

    ratio = bench_memory.main(["--images", "20", "--dim", "16", "--words", "6", "--batch", "7"])
    assert ratio >= 0 and "x the embeddings" in capsys.readouterr().out


# ---- the fused Triton kernel (zoo/blocks/triton_attention.py), in Triton's interpreter ----------------------------
def _triton():
    from zoo.blocks import triton_attention

    assert triton_attention.available(), "triton is part of the test extra (pyproject): `make venv` installs it"
    assert triton_attention.interpreting() or torch.cuda.is_available(), "tests run it with TRITON_INTERPRET=1"
    return triton_attention


@pytest.mark.parametrize("norm", ["clipped_l2", "relu_l2", "l2"])
@pytest.mark.parametrize("aggs", [("mean", "mean"), ("lse", "mean"), ("mean", "lse")])
@pytest.mark.parametrize("directions", [(True, True), (True, False), (False, True)])
def test_triton_kernel_equals_torch_group_scores(norm, aggs, directions):
    """The fused kernel against the PyTorch per-group path on one length group (fp32, strided cosines)."""
    from zoo.blocks import fast_attention as fa

    ta = _triton()
    g = torch.Generator().manual_seed(3)
    n_img, n_reg, n, l, d = 3, 5, 4, 7, 6
    regions, words = torch.randn(n_img, n_reg, d, generator=g), torch.randn(n, l, d, generator=g)
    regions[1, 2] = 0.0  # a zero region
    words[0, 3] = 0.0  # a zero word
    ru, rn = fa._unit(regions)
    wu, wn = fa._unit(words.reshape(-1, d))
    wu = wu.view(n, l, d)
    x = torch.einsum("ird,cjd->ircj", ru, wu).transpose(0, 1).contiguous().transpose(0, 1)  # non-default strides
    wg, rg = torch.bmm(wu, wu.transpose(1, 2)), torch.bmm(ru, ru.transpose(1, 2))
    cfg = fa._Config(*directions, norm, 4.0, 9.0, aggs[0], aggs[1], 6.0)
    with torch.no_grad():
        want = fa._group_scores(x.clone(), wn.view(n, l), wg, rn, rg, cfg, inplace=False)
    got = ta.group_scores(x, wn.view(n, l), wg, rn, rg, cfg)
    for a, b in zip(want, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.isfinite(b).all() and (a - b).abs().max() <= 1e-6


def test_triton_kernel_through_the_scorer_equals_reference(monkeypatch):
    """kernel='triton' (argument or ZOO_KERNEL) scores a padded block with zero vectors like the reference; other
    normalisations, gradients and global_weights keep the PyTorch path; bad values are reported."""
    _triton()
    images, captions, lengths = _batch(dtype=torch.float32)
    kw = dict(lambda_i2t=4.0, lambda_t2i=9.0, agg_i2t="lse")
    with torch.no_grad():
        ref = _both(images, captions, lengths, True, **kw)
        got = fast_similarity(images, captions, lengths, kernel="triton", **kw)
        monkeypatch.setenv("ZOO_KERNEL", "triton")
        via_env = cross_attention_similarity(images, captions, lengths, **kw)
        other = fast_similarity(images, captions, lengths, norm="softmax", kernel="triton")  # PyTorch path
        assert torch.allclose(other["i2t"], fast_similarity(images, captions, lengths, norm="softmax",
                                                            kernel="torch")["i2t"])
    for k in ref:
        assert (got[k] - ref[k]).abs().max() <= 1e-5 and torch.equal(got[k], via_env[k])
    img = images.clone().requires_grad_()
    s = fast_similarity(img, captions, lengths, kernel="triton", **kw)  # training: the PyTorch path, with grads
    s["i2t"].sum().backward()
    assert torch.isfinite(img.grad).all()
    with pytest.raises(ValueError, match="kernel must be"):
        fast_similarity(images, captions, lengths, kernel="cuda")


def test_triton_kernel_unavailable_is_a_clear_error(monkeypatch):
    """kernel='triton' on CPU tensors without Triton's interpreter, or without triton: errors that name the fix."""
    from zoo.blocks import fast_attention as fa

    ta = _triton()
    x = torch.zeros(1, 2, 1, 3)
    cfg = fa._Config(True, True, "clipped_l2", 4.0, 9.0, "mean", "mean", 6.0)
    args = (x, torch.ones(1, 3), torch.eye(3)[None], torch.ones(1, 2), torch.eye(2)[None], cfg)
    monkeypatch.setattr(ta, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ta.group_scores(*args)
    monkeypatch.setattr(ta, "interpreting", lambda: True)
    monkeypatch.setattr(ta, "triton", None)
    ta._kernel.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="needs the triton package"):
            ta.group_scores(*args)
    finally:
        ta._kernel.cache_clear()
    with pytest.raises(ValueError, match="l2-family"):
        ta.group_scores(x, *args[1:5], fa._Config(True, True, "softmax", 4.0, 9.0, "mean", "mean", 6.0))
