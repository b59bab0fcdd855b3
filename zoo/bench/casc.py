"""Evaluation time of CASC (S_G reading (a), pair-dependent) against CASC-base on the same [I, 5I] grid.

    python -m zoo.bench casc --images 200 --dim 256 --repeats 3

Both score with the shared blockwise loop (zoo.engine.evaluation.score_blockwise) on random embeddings (the cost does
not depend on their values; caption lengths follow COCO's). CASC's time includes projecting regions and words
to the label head's hidden size (done once per item). `--naive` also times the same S_G formed the obvious way,
materialising the d-dim attention vectors A^I, A^T of every pair, to show what the projection saves.
Prints each time (median of the repeats, runs interleaved) and the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .common import coco_lengths
from ..blocks import region_word_scores
from ..blocks.attention import block_global_weights
from ..blocks.semantic import prediction_cosine
from ..engine.evaluation import score_blockwise
from ..methods import CASC, CASCBase


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--labels", type=int, default=500)
    ap.add_argument("--image-block", type=int, default=100)
    ap.add_argument("--caption-block", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n_img, n_cap = args.images, 5 * args.images
    lengths = coco_lengths(n_cap, g)
    regions = torch.nn.functional.normalize(torch.randn(n_img, args.regions, args.dim, generator=g), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(n_cap, int(lengths.max()), args.dim, generator=g), dim=-1)
    words = words * (torch.arange(words.shape[1])[None] < lengths[:, None])[..., None]
    base = CASCBase(vocab_size=10, embed_dim=args.dim, lambda_i2t=4.0, lambda_t2i=9.0, aggregation_i2t="lse",
                    aggregation_t2i="mean").eval()
    casc = CASC(vocab_size=10, embed_dim=args.dim, num_labels=args.labels).eval()
    ids = {"image_ids": torch.arange(n_img)}, {"caption_ids": torch.arange(n_cap)}

    def run_base():
        return score_blockwise(base.score, {"regions": regions}, {"words": words, "lengths": lengths},
                               args.image_block, args.caption_block)

    def run_casc():
        img = {"regions": regions, "regions_proj": casc.label_head.project(regions), **ids[0]}
        cap = {"words": words, "lengths": lengths, "words_proj": casc.label_head.project(words), **ids[1]}
        return score_blockwise(casc.score, img, cap, args.image_block, args.caption_block)

    def naive_score(img, cap):
        hp = casc.hparams
        sc = region_word_scores(img["regions"], cap["words"], cap["lengths"])
        w_r, w_l = block_global_weights(sc, smooth_i2t=hp.lambda_i2t, smooth_t2i=hp.lambda_t2i)
        a_img = torch.einsum("icr,ird->icd", w_r, img["regions"])  # [I, C, d] per pair
        a_txt = torch.einsum("icl,cld->icd", w_l, cap["words"])
        s_g = prediction_cosine(casc.label_head(a_img), casc.label_head(a_txt))
        s_loc = casc.score_parts(img, cap, with_global=False)[0]
        return casc.beta * s_loc + (1 - casc.beta) * s_g

    def run_naive():
        return score_blockwise(naive_score, {"regions": regions, **ids[0]}, {"words": words, "lengths": lengths, **ids[1]},
                               args.image_block, args.caption_block)

    runs = {"casc_base": run_base, "casc_sg_a": run_casc}
    if args.naive:
        runs["casc_sg_a_naive"] = run_naive
    times: dict[str, list[float]] = {k: [] for k in runs}
    out = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                out[name] = fn()
                times[name].append(time.perf_counter() - t)
    if args.naive:
        assert torch.allclose(out["casc_sg_a"], out["casc_sg_a_naive"], atol=1e-5), "naive and projected S_G disagree"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"grid {n_img} images x {n_cap} captions, d={args.dim}, K={args.labels}, blocks {args.image_block}x"
          f"{args.caption_block}, threads={torch.get_num_threads()}, median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:18s} {v:8.2f} s   (runs: {', '.join(f'{x:.2f}' for x in times[k])})")
    print(f"  CASC (S_G a) / CASC-base = {med['casc_sg_a'] / med['casc_base']:.2f}")
    if args.naive:
        print(f"  naive S_G / projected S_G (whole CASC score) = {med['casc_sg_a_naive'] / med['casc_sg_a']:.2f}")


if __name__ == "__main__":
    main()
