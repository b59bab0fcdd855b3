"""CCCL blocks, each against an independent slow computation written from the paper's equations (float64)."""
import math

import pytest
import torch

from zoo.blocks.coherence import coherence_loss, hybrid_loss
from zoo.blocks.cpc import BoxPositionEmbedding, ContextPerceivedCell, VisualContextEmbedding, box_position_tuple
from zoo.blocks.graph import (ContextGRU, ResidualGCN, dependency_edges, full_edges, gru_input_projection,
                              pair_gru_last_state, slow_pair_gru_last_state)
from zoo.blocks.losses import triplet_ranking_loss
from zoo.blocks.vsf import SimilarityScorer, VectorSimilarity, global_pool, local_similarity


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def test_cpc_matches_equations_and_ignores_padding():
    d, n = 6, 5
    cell = ContextPerceivedCell(d, "one")  # Eq. (7) as printed: alpha = 1
    y = torch.randn(2, n, d)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    y[1, 3:] = 100.0  # garbage in padding
    out = cell(y, mask)
    for b in range(2):
        m = int(mask[b].sum())
        Y = y[b, :m]
        Q, K, V = Y @ cell.q.weight.T, Y @ cell.k.weight.T, Y @ cell.v.weight.T  # Eq. (1)
        U = Q * K  # Eq. (3)
        GQ = 1 / (1 + torch.exp(-(U @ cell.gate_q.weight.T + cell.gate_q.bias)))  # Eq. (4)
        GK = 1 / (1 + torch.exp(-(U @ cell.gate_k.weight.T + cell.gate_k.bias)))
        Qh, Kh = Q * GQ, K * GK  # Eq. (5), with G_K for the key
        for i in range(m):
            logits = torch.stack([Qh[i] @ Kh[j] / math.sqrt(d) for j in range(m)])
            w = torch.exp(logits) / torch.exp(logits).sum()
            expect = (w[:, None] * V).sum(0) + Y[i]  # Eqs. (6)-(7)
            assert torch.allclose(out[b, i], expect, atol=1e-10)
    assert torch.all(out[1, 3:] == 0)


def test_cpc_learned_gain_starts_as_the_identity_and_learns():
    d = 6
    cell = ContextPerceivedCell(d)  # default: CPC(Y) = alpha A^ + Y, alpha = 0 at the start
    assert cell.residual_gain == "learned" and float(cell.alpha.detach()) == 0.0
    y = torch.randn(2, 5, d)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = cell(y, mask)
    assert torch.equal(out, y * mask[..., None])  # the identity on real items, 0 on padding
    out.pow(2).sum().backward()
    assert cell.alpha.grad is not None and float(cell.alpha.grad) != 0.0  # the gain is trained
    printed = ContextPerceivedCell(d, "one")
    printed.load_state_dict(cell.state_dict(), strict=False)
    with torch.no_grad():
        cell.alpha.fill_(0.3)
        w, v = printed.attention(y, mask)
        expect = (0.3 * (w @ v) + y) * mask[..., None]
        assert torch.allclose(cell(y, mask), expect, atol=1e-12)
        assert torch.allclose(printed(y, mask), ((w @ v) + y) * mask[..., None], atol=1e-12)
    assert "alpha" not in printed.state_dict()  # Eq. (7)'s fixed 1 is not a weight
    with pytest.raises(ValueError, match="residual_gain"):
        ContextPerceivedCell(d, "half")


def test_text_fc_xavier_zero_bias_and_bigru_l2():
    from zoo.blocks.cpc import TextContextEmbedding
    from zoo.methods import CCCL

    emb = TextContextEmbedding(10, 8)
    assert torch.all(emb.fc.bias == 0) and emb.fc.weight.abs().max() <= math.sqrt(6 / 18)
    torch.manual_seed(0)
    default = TextContextEmbedding(10, 8, fc_init="default")
    assert default.fc.bias.abs().sum() > 0
    with pytest.raises(ValueError, match="text FC init"):
        TextContextEmbedding(10, 8, fc_init="normal")
    model = CCCL(vocab_size=20, feature_dim=8, embed_dim=12, sim_dim=6, word_dim=8, text_encoder="bigru")
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    lengths = torch.tensor([5, 3])
    e, n = model.net.word_features({"tokens": tokens, "lengths": lengths})
    assert n.tolist() == [3, 1]
    norms = e.norm(dim=-1)
    assert torch.allclose(norms[0], torch.ones(3)) and torch.allclose(norms[1, :1], torch.ones(1))  # l2 per word
    raw = CCCL(vocab_size=20, feature_dim=8, embed_dim=12, sim_dim=6, word_dim=8, text_encoder="bigru",
               bigru_l2=False)
    e_raw, _ = raw.net.word_features({"tokens": tokens, "lengths": lengths})
    assert not torch.allclose(e_raw.norm(dim=-1)[0], torch.ones(3))


def test_cpc_all_padding_row_is_finite_forward_and_backward():
    cell = ContextPerceivedCell(4)
    y = torch.randn(2, 3, 4, requires_grad=True)
    out = cell(y, torch.tensor([[True, True, False], [False, False, False]]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(y.grad).all()


def test_position_tuple_and_embedding():
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 0.8], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.3, 0.3]]])
    s = box_position_tuple(boxes)
    # x1/W, y1/H, x2/W, y2/H, w*h/(W*H), w/(w+h) with W = H = 1
    assert torch.allclose(s[0, 0], torch.tensor([0.1, 0.2, 0.5, 0.8, 0.4 * 0.6, 0.4 / 1.0]))
    assert torch.allclose(s[0, 1], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.5]))
    assert torch.allclose(s[0, 2], torch.tensor([0.3, 0.3, 0.3, 0.3, 0.0, 0.5]))  # empty box: square by convention
    s2 = box_position_tuple(boxes, "corners_size")
    assert torch.allclose(s2[0, 0], torch.tensor([0.1, 0.2, 0.5, 0.8, 0.4, 0.6]))
    emb = BoxPositionEmbedding(5)
    out = emb(boxes)
    expect = 1 / (1 + torch.exp(-(s[0, 0] @ emb.fc.weight.T + emb.fc.bias)))  # Eq. (9)
    assert torch.allclose(out[0, 0], expect)
    with pytest.raises(ValueError, match="unknown position tuple"):
        BoxPositionEmbedding(5, "xyxy")


def test_position_fusion_product_as_printed_and_sum():
    """Eq. (10)'s Q^ o S^ (position_fusion='product') and the additive reading Q^ + (S^ - 1/2) ('sum'), each against
    the FC and sigmoid of Eqs. (8)-(9) written out; mirrored boxes change the CPC input either way."""
    feats = torch.rand(2, 3, 7)
    boxes = torch.rand(2, 3, 2) * 0.5
    boxes = torch.cat([boxes, boxes + 0.4], -1)  # x1 < x2, y1 < y2
    mirrored = torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1)
    for fusion in ("product", "sum"):
        torch.manual_seed(1)
        emb = VisualContextEmbedding(7, 5, use_cpc=False, position_fusion=fusion)
        q = feats @ emb.fc.weight.T + emb.fc.bias  # Eq. (8)
        s = 1 / (1 + torch.exp(-(box_position_tuple(boxes) @ emb.position.fc.weight.T + emb.position.fc.bias)))
        expect = q * s if fusion == "product" else q + s - 0.5
        assert torch.allclose(emb(feats, boxes), expect)
        assert not torch.allclose(emb(feats, boxes), emb(feats, mirrored))
    with pytest.raises(ValueError, match="unknown position_fusion"):
        VisualContextEmbedding(7, 5, position_fusion="concat")


def test_vsf_matches_equation_and_pairwise_equals_paired():
    vsf = VectorSimilarity(5, 3)
    a, b = torch.randn(4, 5), torch.randn(2, 5)
    out = vsf.pairwise(a, b)
    printed = VectorSimilarity(5, 3, normalize_inputs=False)
    raw = printed.pairwise(a, b)
    for i in range(4):
        for c in range(2):
            x = printed.weight.weight @ (a[i] - b[c]) ** 2  # Eq. (15) as printed
            assert torch.allclose(raw[i, c], x / x.norm())
            x = vsf.weight.weight @ (a[i] / a[i].norm() - b[c] / b[c].norm()) ** 2  # SGRAF: unit inputs
            assert torch.allclose(out[i, c], x / x.norm())
    cos = VectorSimilarity(5, 3, use_vsf=False).pairwise(a, b)
    assert cos.shape == (4, 2, 1)
    assert torch.allclose(cos[1, 0, 0], a[1] @ b[0] / (a[1].norm() * b[0].norm()))


def test_global_pooling_ignores_padding():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    x[1, 2:] = 50.0
    out = global_pool(x, mask)
    assert torch.allclose(out[1], x[1, :2].max(0).values + x[1, :2].mean(0))  # Eq. (13)
    assert torch.allclose(global_pool(x, mask, "max")[1], x[1, :2].max(0).values)
    assert torch.allclose(global_pool(x, mask, "mean")[1], x[1, :2].mean(0))


def _slow_direction(query, context, lam, vsf):
    """Eqs. (17)-(19) for one pair and one direction, from the cosine matrix, with explicit loops."""
    nq, nk = query.shape[0], context.shape[0]
    M = torch.zeros(nq, nk)
    for i in range(nq):
        for j in range(nk):
            M[i, j] = query[i] @ context[j] / (query[i].norm() * context[j].norm())
    R = M.clamp_min(0)
    Mbar = R / R.pow(2).sum(0, keepdim=True).sqrt().clamp_min(1e-8)  # l2 over the query side (the column)
    sims = []
    for i in range(nq):
        w = torch.exp(lam * Mbar[i]) / torch.exp(lam * Mbar[i]).sum()  # Eq. (17), over the context
        u = (w[:, None] * context).sum(0)
        sims.append(vsf(query[i], u))
    return torch.stack(sims).mean(0)


def test_local_branch_both_directions_match_slow_loops():
    d, P = 6, 4
    v2t, t2v = VectorSimilarity(d, P), VectorSimilarity(d, P)
    regions = torch.randn(2, 3, d)
    words = torch.randn(3, 5, d)
    lengths = torch.tensor([5, 2, 4])
    words[1, 2:] = 9.0  # padding garbage
    out = local_similarity(regions, words, lengths, v2t, t2v, smooth=9.0)
    for i in range(2):
        for c in range(3):
            t = words[c, : lengths[c]]
            expect = _slow_direction(regions[i], t, 9.0, v2t) + _slow_direction(t, regions[i], 9.0, t2v)  # Eq. (20)
            assert torch.allclose(out[i, c], expect, atol=1e-8), (i, c)


def test_gcn_dependency_mask_and_equation():
    d = 4
    gcn = ResidualGCN(d, layers=1)
    t = torch.randn(1, 4, d)
    mask = torch.tensor([[True, True, True, False]])
    adj = torch.zeros(1, 4, 4)
    adj[0, 0, 1] = adj[0, 1, 0] = 1  # arcs 0-1 and 1-2 only; 0-2 has none
    adj[0, 1, 2] = adj[0, 2, 1] = 1
    adj[0, 0, 3] = adj[0, 3, 0] = 1  # an arc to a padded word must not count
    edges = dependency_edges(adj, mask)
    we = gcn.edge_weights(t, edges)
    assert we[0, 0, 2] == 0 and we[0, 2, 0] == 0 and we[0, 0, 3] == 0 and we[0, 0, 0] == 0
    out = gcn(t, edges, mask)
    # independent: affinities (Eq. 22), softmax over each node's arcs, H + W_R(W_e H W_G) (Eq. 24, W_R as d x d)
    A = (t[0] @ gcn.affinity.w1.weight.T) @ (t[0] @ gcn.affinity.w2.weight.T).T / math.sqrt(d)
    nbrs = {0: [1], 1: [0, 2], 2: [1]}
    for i, js in nbrs.items():
        w = torch.softmax(A[i, js], 0)
        msg = sum(w[k] * (t[0, j] @ gcn.w_g[0].weight.T) for k, j in enumerate(js))
        assert torch.allclose(out[0, i], t[0, i] + msg @ gcn.w_r[0].weight.T)
    assert torch.all(out[0, 3] == 0)
    # node 0 has no arc to node 2: changing word 2 alone leaves node 0 unchanged (one layer)
    t2 = t.clone()
    t2[0, 2] += 3.0
    assert torch.allclose(gcn(t2, dependency_edges(adj, mask), mask)[0, 0], out[0, 0])
    assert not torch.allclose(gcn(t2, full_edges(mask), mask)[0, 0], gcn(t, full_edges(mask), mask)[0, 0])


def test_gcn_isolated_node_is_finite_backward():
    gcn = ResidualGCN(3, layers=2)
    t = torch.randn(1, 2, 3, requires_grad=True)
    out = gcn(t, torch.zeros(1, 2, 2, dtype=torch.bool))
    out.sum().backward()
    assert torch.allclose(out, t) and torch.isfinite(t.grad).all()


def test_pair_batched_context_gru_equals_per_pair_nn_gru():
    d = 5
    g = ContextGRU(d)
    first = torch.randn(3, d)  # one per item of side A (e.g. the images' v^S)
    nodes = torch.randn(4, 6, d)  # side B (e.g. the captions' words)
    lengths = torch.tensor([6, 1, 3, 4])
    nodes[1, 1:] = 7.0
    fast = pair_gru_last_state(g.text_gru, gru_input_projection(g.text_gru, first),
                               gru_input_projection(g.text_gru, nodes), lengths)
    for a in range(3):
        for b in range(4):
            slow = slow_pair_gru_last_state(g.text_gru, first[a], nodes[b], int(lengths[b]))
            assert torch.allclose(fast[a, b], slow, atol=1e-10)
    no_ctx = pair_gru_last_state(g.text_gru, None, gru_input_projection(g.text_gru, nodes), lengths)
    assert no_ctx.shape == (1, 4, d)
    assert torch.allclose(no_ctx[0, 2], slow_pair_gru_last_state(g.text_gru, None, nodes[2], 3), atol=1e-10)


def test_mlp_scorer_matches_equation_28():
    sc = SimilarityScorer(4, ("global", "local"), "mlp")
    s = torch.randn(2, 3, 4)
    W1, b1, W2, b2 = sc.mlp[0].weight, sc.mlp[0].bias, sc.mlp[2].weight, sc.mlp[2].bias
    expect = 1 / (1 + torch.exp(-((W1 @ s[1, 2] + b1).clamp_min(0) @ W2[0] + b2[0])))
    assert torch.allclose(sc(s, "global")[1, 2], expect)
    assert torch.equal(sc(s, "global"), sc(s, "local"))  # shared
    lin = SimilarityScorer(4, ("global", "local"), "linear")
    assert not torch.equal(lin(s, "global"), lin(s, "local"))  # one layer per branch


def test_coherence_loss_matches_double_sum():
    b = 3
    S = {k: torch.rand(b, b) for k in ("global", "local", "relational")}
    expect = 0.0
    for i in range(b):
        for j in range(b):
            x, y, z = S["global"][i, j], S["local"][i, j], S["relational"][i, j]
            expect += math.sqrt((x - y) ** 2) + math.sqrt((x - z) ** 2) + math.sqrt((y - z) ** 2)  # Eqs. (29)-(31)
    assert torch.allclose(coherence_loss(S), torch.tensor(expect))
    assert torch.allclose(coherence_loss(S, "mean"), torch.tensor(expect / b ** 2))
    assert coherence_loss({"global": S["global"]}) == 0
    fused = sum(S.values()) / 3
    parts = hybrid_loss(fused, S, 0.2, 0.75)
    assert torch.allclose(parts["triplet"], triplet_ranking_loss(fused, 0.2))
    assert torch.allclose(parts["coherence"], 0.75 * torch.tensor(expect))
    assert "coherence" not in hybrid_loss(fused, S, 0.2, 0.0)
