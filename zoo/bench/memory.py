"""Peak memory of the shared evaluation flow against the size of the embeddings it evaluates.

    python -m zoo.bench memory                      # COCO-1K shapes: 1,000 images x 36 x 1024, 5,000 captions x 40
    python -m zoo.bench memory --images 5000 --device cuda      # COCO-5K shapes on a GPU

What RetrievalModule does at the end of validation/test: concatenate the per-batch embeddings, put them in id
order, score the grid block by block. The scorer is a cheap stand-in (mean region . summed words), so the peak is
set by the copies the flow makes of the embeddings, not by a method's working set (`make bench` measures those).
Prints the embeddings' size, the peak rise over what was resident before (the per-batch embeddings), and the
ratio: 1.0x means one concatenated copy and nothing else the size of the embeddings.
"""
from __future__ import annotations

import argparse

import torch

from .common import PeakMemory
from ..engine.evaluation import cat_embeddings
from ..methods import CASCBase


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--words", type=int, default=40, help="padded caption length")
    ap.add_argument("--batch", type=int, default=100, help="images per evaluation batch (x5 captions)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    model = CASCBase(vocab_size=10, embed_dim=args.dim, fold_size=None, eval_image_block=128, eval_caption_block=1024)
    model.score = lambda i, c: i["regions"].mean(1) @ c["words"].sum(1).T  # cheap: the copies set the peak
    chunks = []
    for b in range(0, args.images, args.batch):
        n = min(args.batch, args.images - b)
        lengths = torch.randint(min(8, args.words), args.words + 1, (5 * n,), generator=g)
        chunks.append(({"regions": torch.randn(n, args.regions, args.dim, generator=g).to(dev)},
                       {"words": torch.randn(5 * n, args.words, args.dim, generator=g).to(dev),
                        "lengths": lengths.to(dev)},
                       torch.arange(b, b + n, device=dev), torch.arange(5 * b, 5 * (b + n), device=dev)))
    emb_mb = sum(v.numel() * v.element_size() for c in chunks for d in c[:2] for v in d.values()) / 2**20
    with PeakMemory(dev) as mem:  # the steps of RetrievalModule._eval_end
        image_ids, caption_ids = torch.cat([c[2] for c in chunks]), torch.cat([c[3] for c in chunks])
        img, cap = cat_embeddings([c[0] for c in chunks]), cat_embeddings([c[1] for c in chunks])
        del chunks
        model.evaluate_embeddings(img, cap, image_ids, caption_ids, args.images)
    ratio = (mem.peak_mb or 0.0) / emb_mb
    print(f"zoo.bench memory on {dev}: {args.images} images x {args.regions} regions, {5 * args.images} captions x "
          f"{args.words} words, d={args.dim}: embeddings {emb_mb:,.0f} MB; peak rise during evaluation "
          f"{mem.peak_mb or 0:,.0f} MB = {ratio:.2f}x the embeddings")
    return ratio


if __name__ == "__main__":
    main()
