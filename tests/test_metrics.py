import numpy as np
import pytest
import torch

from zoo.engine.metrics import RetrievalMetrics, all_metrics, fold_metrics, i2t_ranks, retrieval_metrics, t2i_ranks


def _slow_ranks(sims, k=5):
    """SCAN's i2t/t2i rank loops (argsort), for matrices without ties."""
    s = sims.numpy()
    n = s.shape[0]
    r_i2t = []
    for i in range(n):
        order = np.argsort(s[i])[::-1]
        r_i2t.append(min(np.where(order == c)[0][0] for c in range(k * i, k * i + k)))
    r_t2i = []
    for c in range(s.shape[1]):
        order = np.argsort(s[:, c])[::-1]
        r_t2i.append(np.where(order == c // k)[0][0])
    return np.array(r_i2t), np.array(r_t2i)


def test_ranks_match_argsort_reference():
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(7, 35, generator=g, dtype=torch.float64)
    a, b = _slow_ranks(sims)
    assert i2t_ranks(sims).tolist() == a.tolist()
    assert t2i_ranks(sims).tolist() == b.tolist()


def test_hand_computed_metrics():
    # 2 images, 1 caption each (caps_per_image=1)
    sims = torch.tensor([[0.9, 0.1],   # image 0: its caption first -> rank 0
                         [0.8, 0.7]])  # image 1: caption 1 second -> rank 1
    assert i2t_ranks(sims, 1).tolist() == [0, 1]
    # caption 0: image0 .9 > image1 .8 -> rank 0; caption 1: image1 .7 > image0 .1 -> rank 0
    assert t2i_ranks(sims, 1).tolist() == [0, 0]
    m = retrieval_metrics(sims, 1)
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0 and m["t2i_r1"] == 100.0
    assert m["rsum"] == 50 + 100 + 100 + 100 + 100 + 100
    assert m["mR"] == pytest.approx(550 / 6)
    assert m["i2t_meanr"] == 1.5 and m["t2i_medr"] == 1.0


def test_ties_are_pessimistic():
    m = retrieval_metrics(torch.zeros(10, 50))
    assert m["t2i_r1"] == 0.0 and m["i2t_r1"] == 0.0  # a constant scorer is not perfect


def test_perfect_and_folds():
    n = 10
    sims = torch.eye(n).repeat_interleave(5, dim=1)
    m = all_metrics(sims, 5, fold_size=5)
    assert m["all"]["rsum"] == 600 and m["fold5"]["rsum"] == 600
    # folds see only their own block: make image 7 confuse caption 5 (image 1) — only the full set suffers
    sims[7, 5] = 2.0
    full = retrieval_metrics(sims)
    folds = fold_metrics(sims, 5)
    assert full["t2i_r1"] == pytest.approx(98.0) and folds["t2i_r1"] == 100.0


def test_nan_similarities_raise():
    with pytest.raises(FloatingPointError):
        retrieval_metrics(torch.full((2, 10), float("nan")))
    with pytest.raises(ValueError, match="captions per image"):
        retrieval_metrics(torch.zeros(2, 9))


def test_torchmetric_dedupes_and_detects_missing_rows():
    g = torch.Generator().manual_seed(3)
    sims = torch.rand(6, 30, generator=g)
    metric = RetrievalMetrics()
    metric.update(sims[[0, 1, 2]], torch.tensor([0, 1, 2]))
    metric.update(sims[[3, 4, 5, 0]], torch.tensor([3, 4, 5, 0]))  # a padded repeat of image 0
    assert metric.compute()["all"] == retrieval_metrics(sims)
    metric = RetrievalMetrics()
    metric.update(sims[[0, 1]], torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="missing"):
        metric.compute()


def test_median_rank_follows_numpy_for_an_even_count():
    """The official evaluation: floor(np.median(ranks)) + 1, the mean of the two middle ranks (VSE-infinity's
    golden i2t medr is 3 from ranks whose two middle values are 1 and 4)."""
    import numpy as np

    from zoo.engine.metrics import summarize_ranks

    r = torch.tensor([0, 0, 1, 4, 6, 9])
    m = summarize_ranks(r, r)
    assert m["i2t_medr"] == np.floor(np.median(r.numpy())) + 1 == 3.0
