"""Draws where each word of a caption looks: the T2I attention (CASC Eq. (6)) of a trained model over the
image's region boxes, one panel per word. Needs {split}_boxes.npy (SynthScenes has them).

    python -m zoo.attention_map --ckpt runs/casc_base_synth/checkpoints/best.ckpt \
        --root .cache/synthscenes --split test --image 0 --caption 0 --out attention.png
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from datamodules import PrecompDataModule  # noqa: E402
from datamodules.datasets import collate  # noqa: E402
from datamodules.layout import open_npy, split_paths  # noqa: E402
from datamodules.text import Vocabulary  # noqa: E402
from zoo.blocks import attend  # noqa: E402
from zoo.methods import CASCBase  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--root", default=".cache/synthscenes")
    ap.add_argument("--split", default="test")
    ap.add_argument("--image", type=int, default=0)
    ap.add_argument("--caption", type=int, default=0, help="which of the image's captions (0-4)")
    ap.add_argument("--out", default="attention.png")
    args = ap.parse_args()
    model = CASCBase.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    hp = model.hparams
    shape = open_npy(split_paths(args.root, args.split)["ims"]).shape  # regions/dims as stored
    dm = PrecompDataModule(args.root, test_split=args.split, with_boxes=True, num_workers=0,
                           num_regions=shape[1], feature_dim=shape[2])
    if model.vocab_words is not None:  # the words the model was trained with, not whatever the folder holds now
        dm.use_vocabulary(Vocabulary.from_words(model.vocab_words))
    item = dm.dataset("test")[args.image]
    item["captions"] = [item["captions"][args.caption]]
    batch = collate([item])
    with torch.no_grad():
        regions = model.encode_images(batch)["regions"]
        cap = model.encode_captions(batch)
        words, n = cap["words"], int(cap["lengths"][0])
        _, alpha = attend(words[:, :n], regions, smooth=hp.lambda_t2i, norm=hp.score_norm)  # [1, n, R]
    vocab = dm.vocab
    tokens = [vocab.idx2word[t] for t in batch["tokens"][0, :n].tolist()][1:-1]
    alpha = alpha[0, 1:-1]  # drop <start>/<end>
    boxes = batch["boxes"][0]
    cols = min(6, len(tokens))
    rows = -(-len(tokens) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([]), ax.set_xlim(0, 1), ax.set_ylim(1, 0), ax.set_aspect("equal")
    for k, (ax, word) in enumerate(zip(axes.flat, tokens)):
        w = alpha[k] / alpha[k].max()
        for r in torch.argsort(w):  # strongest drawn last, on top
            x1, y1, x2, y2 = boxes[r].tolist()
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=(0.85, 0.1, 0.1, 0.6 * float(w[r])),
                                       edgecolor=(0, 0, 0, 0.15 + 0.85 * float(w[r])), lw=0.8))
        ax.set_title(word, fontsize=11)
    caption = " ".join(tokens)
    fig.suptitle(f"{args.split} image {args.image}: \"{caption}\"  (T2I attention, λ2 = {hp.lambda_t2i:g})", fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
