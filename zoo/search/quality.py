"""Two-stage retrieval against exact all-pairs evaluation, from one checkpoint (README, Search: quality).

    python -m zoo.search.quality --ckpt runs/casc_base_synth/checkpoints/best.ckpt --root .cache/synthscenes \
        --out runs/search_quality/casc_base [--rerank 10 20 50 100 200 500] [--first-stage C2]

Builds (or reuses) the image and the caption index of the split under --out, then for every rerank value gives
R@1/5/10 both ways when each query (every caption for text->image, every image for image->text) keeps only its
stage-1 candidates, re-ranked by the method's exact score, beside
- "exact (index)": the same exact scores over the whole gallery (what rerank=None returns);
- "exact (zoo.metrics)": the usual evaluation, float32 embeddings encoded afresh, all pairs scored;
and the share of queries whose exact top-10 is wholly among the candidates. Writes quality.md, quality.csv and
quality.png (recall and full top-10 recovery against rerank).

Two-stage ranks are the exact ranks with every non-candidate pushed below every candidate (ties counted against the
model, as zoo.engine.metrics does), so the numbers are those of running Index.query for every query.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from datamodules.datasets import collate

from ..engine.evaluation import score_blockwise
from ..engine.metrics import i2t_ranks, retrieval_metrics, summarize_ranks, t2i_ranks
from .index import Index, build_index, gallery_datamodule

RERANKS = (10, 20, 50, 100, 200, 500)
COLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def _all(idx: Index) -> dict[str, torch.Tensor]:
    return idx._gallery(np.arange(idx.n))


def _candidates(query_glob: np.ndarray, idx: Index, n: int) -> np.ndarray:
    """[Q, n] stage-1 candidate ids of every query, best first."""
    _, ids = idx.faiss.search(np.ascontiguousarray(query_glob, dtype=np.float32), min(n, idx.n))
    return ids


def _mask(cand: np.ndarray, r: int, n_gallery: int) -> torch.Tensor:
    m = torch.zeros(cand.shape[0], n_gallery, dtype=torch.bool)
    m.scatter_(1, torch.from_numpy(cand[:, :r]).long(), True)
    return m


def measure(ckpt: str, root: str, out: str | Path, split: str = "test", reranks=RERANKS, first_stage: str | None = None,
            progress: bool = True) -> list[dict]:
    out = Path(out)
    img_idx = Index(build_index(ckpt, root, split, "images", out / "images", progress=progress,
                                first_stage=first_stage))
    cap_idx = Index(build_index(ckpt, root, split, "captions", out / "captions", progress=progress,
                                first_stage=first_stage), model=img_idx.model)
    model = img_idx.model
    k = img_idx.meta["caps_per_image"]
    with torch.no_grad():
        img, cap = _all(img_idx), _all(cap_idx)
        sims = score_blockwise(model.score, img, cap, 128, 1024)  # exact, from the stored embeddings
        # the usual evaluation: float32 embeddings encoded afresh from the split
        dm = gallery_datamodule(model, root, split, img_idx.meta.get("parser", "spacy"))
        ds = dm.dataset("test")
        chunks = [collate([ds[i] for i in range(a, min(len(ds), a + 100))], with_pos=dm.with_pos,
                          with_graphs=dm.with_graphs) for a in range(0, len(ds), 100)]
        from ..engine.evaluation import cat_embeddings

        e_img = cat_embeddings([model.encode_images(b) for b in chunks])
        e_cap = cat_embeddings([model.encode_captions(b) for b in chunks])
        ref = retrieval_metrics(score_blockwise(model.score, e_img, e_cap, 128, 1024), k)
    rows = [{"rerank": "exact (zoo.metrics)", **{c: ref[c] for c in COLS}, "top10_i2t": 100.0, "top10_t2i": 100.0}]
    exact = summarize_ranks(i2t_ranks(sims, k), t2i_ranks(sims, k))
    rows.append({"rerank": "exact (index)", **{c: exact[c] for c in COLS}, "top10_i2t": 100.0, "top10_t2i": 100.0})
    # stage 1 of every query: captions search the image index, images the caption index
    n_max = max(reranks)
    cand_t2i = _candidates(cap_idx.glob[:], img_idx, n_max)  # [C, n] image ids
    cand_i2t = _candidates(img_idx.glob[:], cap_idx, n_max)  # [I, n] caption ids
    low = float(sims.min()) - 1.0
    top_t2i = torch.topk(sims.T, min(10, sims.shape[0]), dim=1).indices  # exact top-10 images of each caption
    top_i2t = torch.topk(sims, min(10, sims.shape[1]), dim=1).indices
    for r in reranks:
        m_t2i = _mask(cand_t2i, r, sims.shape[0]).T  # [I, C]: image i is a candidate of caption c
        m_i2t = _mask(cand_i2t, r, sims.shape[1])  # [I, C]: caption c is a candidate of image i
        s_t2i = torch.where(m_t2i, sims, torch.full_like(sims, low))
        s_i2t = torch.where(m_i2t, sims, torch.full_like(sims, low))
        got = summarize_ranks(i2t_ranks(s_i2t, k), t2i_ranks(s_t2i, k))
        rec_t2i = m_t2i.T.gather(1, top_t2i).all(1).double().mean().item() * 100
        rec_i2t = m_i2t.gather(1, top_i2t).all(1).double().mean().item() * 100
        rows.append({"rerank": r, **{c: got[c] for c in COLS}, "top10_i2t": rec_i2t, "top10_t2i": rec_t2i})
    return rows


def write_report(rows: list[dict], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = ["rerank", *COLS, "top10_i2t", "top10_t2i"]
    with open(out / "quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    head = "| rerank | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | rsum | exact top-10 kept, I2T % | T2I % |"
    lines = [f"**{title}**", "", head, "|" + "---|" * 10]
    for r in rows:
        lines.append("| " + " | ".join([str(r["rerank"])] + [f"{r[c]:.1f}" for c in keys[1:]]) + " |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = [r for r in rows if isinstance(r["rerank"], int)]
    xs = [r["rerank"] for r in two]
    exact = next(r for r in rows if r["rerank"] == "exact (index)")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for c, colour in (("i2t_r1", "C0"), ("i2t_r10", "C1"), ("t2i_r1", "C2"), ("t2i_r10", "C3")):
        a.plot(xs, [r[c] for r in two], "o-", color=colour, label=c.replace("_r", " R@"))
        a.axhline(exact[c], color=colour, ls=":", lw=1)
    a.set_xscale("log"), a.set_xlabel("rerank (stage-1 candidates)"), a.set_ylabel("recall %")
    a.set_title("two-stage recall (dotted: exact)"), a.legend(fontsize=8)
    b.plot(xs, [r["top10_i2t"] for r in two], "o-", label="I2T")
    b.plot(xs, [r["top10_t2i"] for r in two], "o-", label="T2I")
    b.set_xscale("log"), b.set_xlabel("rerank"), b.set_ylabel("% of queries"), b.set_ylim(0, 101)
    b.set_title("exact top-10 wholly among the candidates"), b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=100)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--root", default=".cache/synthscenes")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", required=True, help="folder for the two indexes and the report")
    ap.add_argument("--rerank", type=int, nargs="+", default=list(RERANKS))
    ap.add_argument("--title", default=None)
    ap.add_argument("--first-stage", default=None, metavar="C2", help="stage-1 vectors from this checkpoint")
    args = ap.parse_args(argv)
    rows = measure(args.ckpt, args.root, args.out, args.split, args.rerank, first_stage=args.first_stage)
    title = args.title or f"{Path(args.ckpt).parent.parent.name} on {Path(args.root).name}/{args.split}"
    write_report(rows, Path(args.out), title)
    print((Path(args.out) / "quality.md").read_text())


if __name__ == "__main__":
    main()
