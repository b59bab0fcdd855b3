"""Retrieval metrics: R@1/5/10 both ways, rsum, mR, medr, meanr; COCO 1K (5 folds) and 5K.

Conventions (the SCAN/CASC evaluation protocol):
- sims[i, c] scores image i against caption c; caption c belongs to image c // caps_per_image.
- image -> text: the rank of the best-ranked of the image's ground-truth captions.
- text -> image: the rank of the caption's image.
- ties are counted against the model (pessimistic): a constant scorer gets chance-level recall, never 100%.
Recalls are percentages.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric

KS = (1, 5, 10)
_ROW_CHUNK = 1024  # bounds the [rows, C] boolean temporaries


def _check(sims: torch.Tensor, caps_per_image: int) -> None:
    if sims.dim() != 2:
        raise ValueError(f"similarity matrix must be [images, captions], got shape {tuple(sims.shape)}")
    if sims.shape[1] != sims.shape[0] * caps_per_image:
        raise ValueError(f"similarity matrix {tuple(sims.shape)} does not hold {caps_per_image} captions per image")
    if not torch.isfinite(sims).all():
        raise FloatingPointError("the model produced NaN/Inf similarities; metrics would be meaningless")


def i2t_ranks(sims: torch.Tensor, caps_per_image: int = 5) -> torch.Tensor:
    """0-based rank of the best ground-truth caption for each image query. [I]"""
    _check(sims, caps_per_image)
    n_img = sims.shape[0]
    gt = sims.view(n_img, n_img, caps_per_image)[torch.arange(n_img), torch.arange(n_img)]  # [I, k]
    best = gt.max(dim=1).values
    ranks = torch.empty(n_img, dtype=torch.long, device=sims.device)
    for a in range(0, n_img, _ROW_CHUNK):
        b = min(a + _ROW_CHUNK, n_img)
        at_least = (sims[a:b] >= best[a:b, None]).sum(1)
        ranks[a:b] = at_least - (gt[a:b] >= best[a:b, None]).sum(1)
    return ranks


def t2i_ranks(sims: torch.Tensor, caps_per_image: int = 5) -> torch.Tensor:
    """0-based rank of the ground-truth image for each caption query. [C]"""
    _check(sims, caps_per_image)
    n_cap = sims.shape[1]
    owner = torch.arange(n_cap, device=sims.device) // caps_per_image
    gt = sims[owner, torch.arange(n_cap, device=sims.device)]
    ranks = torch.empty(n_cap, dtype=torch.long, device=sims.device)
    step = _ROW_CHUNK * caps_per_image
    for a in range(0, n_cap, step):
        b = min(a + step, n_cap)
        ranks[a:b] = (sims[:, a:b] >= gt[None, a:b]).sum(0) - 1
    return ranks


def summarize_ranks(r_i2t: torch.Tensor, r_t2i: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, r in (("i2t", r_i2t), ("t2i", r_t2i)):
        r = r.double()
        for k in KS:
            out[f"{name}_r{k}"] = 100.0 * (r < k).double().mean().item()
        # numpy's median (the official evaluation: floor(np.median(ranks)) + 1): the mean of the two middle
        # ranks for an even count (torch.median would take the lower one)
        srt = r.sort().values
        med = (srt[(srt.numel() - 1) // 2] + srt[srt.numel() // 2]) / 2
        out[f"{name}_medr"] = float(torch.floor(med).item() + 1)
        out[f"{name}_meanr"] = r.mean().item() + 1
    recalls = [out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS]
    out["rsum"] = sum(recalls)
    out["mR"] = sum(recalls) / len(recalls)
    return out


def retrieval_metrics(sims: torch.Tensor, caps_per_image: int = 5) -> dict[str, float]:
    """All metrics of one similarity matrix."""
    return summarize_ranks(i2t_ranks(sims, caps_per_image), t2i_ranks(sims, caps_per_image))


def fold_metrics(sims: torch.Tensor, fold_size: int, caps_per_image: int = 5) -> dict[str, float]:
    """Mean of the metrics over consecutive folds of `fold_size` images (COCO 1K: 5 folds of 1,000)."""
    n_img = sims.shape[0]
    if n_img % fold_size:
        raise ValueError(f"{n_img} images do not split into folds of {fold_size}")
    folds = []
    for f in range(n_img // fold_size):
        a, b = f * fold_size, (f + 1) * fold_size
        folds.append(retrieval_metrics(sims[a:b, a * caps_per_image : b * caps_per_image], caps_per_image))
    return {k: sum(m[k] for m in folds) / len(folds) for k in folds[0]}


def all_metrics(sims: torch.Tensor, caps_per_image: int = 5, fold_size: int | None = None) -> dict[str, dict[str, float]]:
    """{'all': metrics on every image} plus {'1k': fold mean} when fold_size splits the set into >1 folds."""
    out = {"all": retrieval_metrics(sims, caps_per_image)}
    if fold_size and sims.shape[0] > fold_size and sims.shape[0] % fold_size == 0:
        out[f"{fold_size // 1000}k" if fold_size % 1000 == 0 else f"fold{fold_size}"] = fold_metrics(
            sims, fold_size, caps_per_image)
    return out


def twin_stats(s_own, s_twin, caps_per_image: int = 5) -> tuple[float, float]:
    """(twin accuracy %, its standard error) from each caption's score with its own image and with that image's
    twin, captions in image order (caption j describes image j // caps_per_image; images 2k, 2k + 1 are twins).

    A tie counts one half. The standard error is clustered by twin pair: the 2 * caps_per_image captions of a pair
    share their two images, so they are not independent draws (the binomial sqrt(p(1-p)/n) would understate it).
    """
    hit = (s_own > s_twin).double() + 0.5 * (s_own == s_twin).double()
    per_pair = 2 * caps_per_image
    if hit.numel() % per_pair:
        raise ValueError(f"twin accuracy needs whole twin pairs: {hit.numel()} captions, {caps_per_image} per image")
    pairs = hit.view(-1, per_pair).mean(1)
    se = float(pairs.std(unbiased=True) / pairs.numel() ** 0.5) if pairs.numel() > 1 else float("nan")
    return float(100 * hit.mean()), 100 * se


def own_and_twin(sims, caps_per_image: int = 5):
    """Each caption's score with its own image and with its twin, from an [I, C] matrix."""
    n_img = sims.shape[0]
    if n_img % 2:
        raise ValueError(f"twin accuracy needs pairs of images, got {n_img}")
    cols = torch.arange(sims.shape[1], device=sims.device)
    own = cols // caps_per_image
    return sims[own, cols], sims[own ^ 1, cols]


def t2i_recall_ties_split(sims, caps_per_image: int = 5, k: int = 1) -> float:
    """T->I R@k (%) with ties broken at random, in expectation: a caption whose image ties with t others and is
    beaten by b counts min(1, max(0, k - b) / (t + 1)). On same-region twins (twin_regions: same) a model that reads
    no boxes gives a caption's image and its twin the very same score; the zoo's metrics count ties against the model
    (above), which puts its T->I R@1 at 0 where a coin flip between the twins would give about half of
    its top-2 rate. Equal to the usual R@k when nothing ties."""
    own, _ = own_and_twin(sims, caps_per_image)
    above = (sims > own[None]).sum(0).double()
    ties = (sims == own[None]).sum(0).double() - 1
    return float(100 * ((k - above).clamp(min=0) / (ties + 1)).clamp(max=1).mean())


def twin_metrics(sims: torch.Tensor, caps_per_image: int = 5) -> dict[str, float]:
    """On twin scenes (images 2k and 2k + 1 mirror twins, SynthScenes `twins: true`): the twin accuracy (%), its
    standard error clustered by pair, and T->I R@1 with ties split; what `make twins` reports, logged every
    validation so that a run's curve shows when the boxes start to count."""
    acc, se = twin_stats(*own_and_twin(sims, caps_per_image), caps_per_image)
    return {"twin_accuracy": acc, "twin_accuracy_se": se, "t2i_r1_ties_split": t2i_recall_ties_split(sims, caps_per_image)}


class RetrievalMetrics(Metric):
    """torchmetrics wrapper: accumulates rows of the similarity matrix (from any rank), computes at the end.

    update(rows [n, C], image_ids [n]) may receive duplicated rows (a DistributedSampler pads with
    repeats); compute() keeps one row per image id and checks that every image is present.
    """

    full_state_update = False

    def __init__(self, caps_per_image: int = 5, fold_size: int | None = None, twins: bool = False, **kwargs):
        """twins: the images come in mirror-twin pairs (2k, 2k + 1): 'all' gains twin_metrics."""
        super().__init__(**kwargs)
        self.caps_per_image = caps_per_image
        self.fold_size = fold_size
        self.twins = twins
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")

    def update(self, rows: torch.Tensor, image_ids: torch.Tensor) -> None:  # type: ignore[override]
        self.rows.append(rows.float())
        self.image_ids.append(image_ids.long())

    def compute(self) -> dict[str, dict[str, float]]:  # type: ignore[override]
        rows = self.rows if isinstance(self.rows, torch.Tensor) else torch.cat(self.rows)
        ids = self.image_ids if isinstance(self.image_ids, torch.Tensor) else torch.cat(self.image_ids)
        n_img = rows.shape[1] // self.caps_per_image
        sims = torch.full((n_img, rows.shape[1]), float("nan"), dtype=rows.dtype, device=rows.device)
        sims[ids] = rows
        seen = torch.zeros(n_img, dtype=torch.bool, device=rows.device)
        seen[ids] = True
        if not seen.all():
            missing = (~seen).nonzero().flatten()[:5].tolist()
            raise RuntimeError(f"evaluation is missing rows for {int((~seen).sum())} images (e.g. {missing})")
        out = all_metrics(sims, self.caps_per_image, self.fold_size)
        if self.twins:
            out["all"].update(twin_metrics(sims, self.caps_per_image))
        return out
