"""Evaluation-speed benchmark: scores an images x (5 * images) grid with a method's pairwise scorer.

    python -m zoo.bench --images 1000               # CPU here
    python -m zoo.bench --images 5000 --device cuda --dtype bf16   # COCO-5K size on a GPU

Embeddings are random (the cost does not depend on their values); caption lengths follow COCO's
(about 12 words + <start>/<end>, up to 30). Prints pairs per second and the time for the whole grid.
"""
from __future__ import annotations

import argparse
import time

import torch

from zoo.evaluation import score_blockwise
from zoo.methods import CASCBase


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--image-block", type=int, default=128)
    ap.add_argument("--caption-block", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n_img, n_cap = args.images, 5 * args.images
    lengths = (torch.randn(n_cap, generator=g) * 3 + 13).round().clamp(6, 30).long()
    img = {"regions": torch.nn.functional.normalize(torch.randn(n_img, args.regions, args.dim, generator=g), dim=-1)}
    words = torch.nn.functional.normalize(torch.randn(n_cap, int(lengths.max()), args.dim, generator=g), dim=-1)
    cap = {"words": words, "lengths": lengths}
    img = {k: v.to(dev) for k, v in img.items()}
    cap = {k: v.to(dev) for k, v in cap.items()}
    model = CASCBase(vocab_size=10, embed_dim=args.dim).to(dev).eval()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    def run():
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            return score_blockwise(model.score, img, cap, args.image_block, args.caption_block, progress=True)

    run() if dev.type == "cuda" else None  # warm-up (kernels, allocator)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    sims = run()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    pairs = n_img * n_cap
    print(f"device={dev} dtype={args.dtype} images={n_img} captions={n_cap} d={args.dim} blocks={args.image_block}x"
          f"{args.caption_block}: {dt:.2f} s, {pairs / dt / 1e6:.2f} M pairs/s; COCO-5K (125M pairs) would take "
          f"{125e6 / (pairs / dt):.1f} s; finite={bool(torch.isfinite(sims).all())}")


if __name__ == "__main__":
    main()
