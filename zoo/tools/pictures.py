"""Pictures of what a trained model looks at, for any checkpoint and test item (PNG).

    # CASC-base / CASC (Figs. 4 and 6): where each word of a caption looks among the region boxes (T2I attention,
    # CASC Eq. (6)); for CASC also the image's top-10 predicted labels with their scores (Fig. 4; averaged over
    # the image's top-3 retrieved test captions, as in the released code)
    python -m zoo.tools.pictures attention --ckpt runs/casc_synth/checkpoints/best.ckpt --root .cache/synthscenes \
        --image 3 --caption 1 --out attention.png
    # CCCL (Fig. 6): region context scores of the visual context-perceived cell (CCCL Eq. (6)): how much every
    # region is read by the others, and what the three most-read regions read
    python -m zoo.tools.pictures context --ckpt runs/cccl_synth/checkpoints/best.ckpt --root .cache/synthscenes --image 3

Needs {split}_boxes.npy (SynthScenes has them; `zoo-convert-tsv` writes them for the bottom-up TSV). The
functions `attention_figure` / `context_figure` take a module and a datamodule (no checkpoint needed).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from datamodules import PrecompDataModule  # noqa: E402
from datamodules.datasets import collate  # noqa: E402
from datamodules.errors import DataError  # noqa: E402
from datamodules.layout import open_npy, split_paths  # noqa: E402
from datamodules.text import Vocabulary  # noqa: E402

from ..blocks import attend  # noqa: E402
from ..engine.checkpoints import check_checkpoint, load_model  # noqa: E402
from ..engine.errors import one_line_errors  # noqa: E402


def load_module(ckpt: str | Path):
    """The LightningModule a checkpoint was trained as (zoo.engine.checkpoints.load_model: the class the CLI recorded),
    in eval mode on CPU."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (train one first, e.g. `make demo`)")
    check_checkpoint(str(path))  # a truncated file: a clear error
    return load_model(path)


def datamodule_for(model, root: str | Path, split: str = "test") -> PrecompDataModule:
    """The split with boxes, read with the model's own vocabulary (not whatever the folder holds now)."""
    shape = open_npy(split_paths(root, split)["ims"]).shape  # regions/dims as stored
    hp = model.hparams
    sub = hp.get("bert_model") if hp.get("text_encoder") == "bert" else None
    dm = PrecompDataModule(root, test_split=split, with_boxes=True, num_workers=0, num_regions=shape[1],
                           feature_dim=shape[2], subword_tokenizer=sub,
                           caps_per_image=int(getattr(model, "caps_per_image", 5)))  # the checkpoint's value
    if getattr(model, "vocab_words", None) is not None:
        dm.use_vocabulary(Vocabulary.from_words(model.vocab_words))
    return dm


def _item_batch(dm, image: int, caption: int | None = None) -> dict:
    ds = dm.dataset("test")
    if not 0 <= image < len(ds):
        raise IndexError(f"--image {image}: the split has images 0..{len(ds) - 1}")
    item = ds[image]
    if caption is not None:
        if not 0 <= caption < len(item["captions"]):
            raise IndexError(f"--caption {caption}: image {image} has captions 0..{len(item['captions']) - 1}")
        item["captions"] = [item["captions"][caption]]
    return collate([item])


def _draw_boxes(ax, boxes: torch.Tensor, weights: torch.Tensor, colour=(0.85, 0.1, 0.1), outline: int | None = None):
    """Boxes shaded by weight (max = full colour); the strongest drawn last, on top."""
    ax.set_xticks([]), ax.set_yticks([]), ax.set_xlim(0, 1), ax.set_ylim(1, 0), ax.set_aspect("equal")
    w = weights / weights.max().clamp_min(1e-12)
    for r in torch.argsort(w).tolist():
        x1, y1, x2, y2 = boxes[r].tolist()
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=(*colour, 0.6 * float(w[r])),
                                   edgecolor=(0, 0, 0, 0.15 + 0.85 * float(w[r])), lw=0.8))
    if outline is not None:
        x1, y1, x2, y2 = boxes[outline].tolist()
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=(0.1, 0.3, 0.95), lw=2.5))


def _words(dm, tokens: torch.Tensor, n: int) -> list[str]:
    return [dm.vocab.idx2word[t] for t in tokens[:n].tolist()][1:-1]  # no <start>/<end>


def predicted_labels(model, dm, image: int, top_captions: int = 3, k: int = 10) -> list[tuple[str, float]]:
    """CASC Fig. 4: the image's top-k (label, score), from A^I paired with its top retrieved test captions
    (CASC.image_label_words, named by the checkpoint's own label dictionary)."""
    if getattr(model, "label_head", None) is None:
        raise ValueError("this checkpoint has no label branch (CASC with global_branch: label predicts labels)")
    if model.label_words is None:
        raise ValueError("this checkpoint stores no label dictionary (saved before checkpoints carried "
                         "zoo_data.label_words): use CASC.image_label_words(datamodule, ...) with the training data's "
                         "label settings, or pass --labels 0 to draw the attention alone")
    return model.image_label_words(dm, [image], top_captions, k)[0]


@torch.no_grad()
def attention_figure(model, dm, image: int = 0, caption: int = 0, labels: int = 10):
    """One panel per word: its T2I attention (CASC Eq. (6), the model's lambda_2) over the region boxes; for
    CASC a last panel with the image's top predicted labels (Fig. 4)."""
    hp = model.hparams
    if "lambda_t2i" not in hp:
        raise ValueError(f"{type(model).__name__} has no CASC word-to-region attention: for CCCL draw the region "
                         "context scores (`python -m zoo.tools.pictures context`)")
    batch = _item_batch(dm, image, caption)
    regions = model.encode_images(batch)["regions"]
    cap = model.encode_captions(batch)
    words, n = cap["words"], int(cap["lengths"][0])
    _, alpha = attend(words[:, :n], regions, smooth=hp.lambda_t2i, norm=hp.score_norm)  # [1, n, R]
    tokens, alpha, boxes = _words(dm, batch["tokens"][0], n), alpha[0, 1:n - 1], batch["boxes"][0]
    top = predicted_labels(model, dm, image, k=labels) if labels and getattr(model, "label_head", None) is not None \
        else []
    panels = len(tokens) + (1 if top else 0)
    cols = min(6, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, word) in enumerate(zip(axes.flat, tokens)):
        ax.axis("on")
        _draw_boxes(ax, boxes, alpha[k])
        ax.set_title(word, fontsize=11)
    if top:
        ax = axes.flat[len(tokens)]
        ax.axis("on")
        names, scores = [w for w, _ in top][::-1], [s for _, s in top][::-1]
        ax.barh(range(len(top)), scores, color=(0.2, 0.45, 0.8))
        ax.set_yticks(range(len(top)), names, fontsize=8)
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"top-{len(top)} labels", fontsize=10)
    fig.suptitle(f"{dm.splits['test']} image {image}: \"{' '.join(tokens)}\"  (T2I attention, λ2 = {hp.lambda_t2i:g})",
                 fontsize=11)
    fig.tight_layout()
    return fig


@torch.no_grad()
def context_scores(model, batch: dict) -> torch.Tensor:
    """CCCL's visual CPC attention (Eq. (6)) of one image, [R, R]; row i = how much region i reads each region."""
    visual = model.net.visual
    if visual.cpc is None:
        raise ValueError("this CCCL has no visual context-perceived cell (the 'w/o V-CPC' row): no context scores")
    weights, _ = visual.cpc.attention(visual.cpc_input(batch["images"], batch.get("boxes")))
    return weights[0]


@torch.no_grad()
def context_figure(model, dm, image: int = 0, top: int = 3):
    """CCCL Fig. 6: each region shaded by the context it gives (mean attention it receives from all regions),
    then, for the `top` most-read regions (blue outline), what that region reads."""
    if not hasattr(model, "net") or not hasattr(model.net, "visual"):
        raise ValueError(f"{type(model).__name__} has no context-perceived cell: for CASC/CASC-base draw the word "
                         "attention (`python -m zoo.tools.pictures attention`)")
    batch = _item_batch(dm, image, 0)
    weights = context_scores(model, batch)
    received = weights.mean(0)
    boxes = batch["boxes"][0]
    most = torch.argsort(received, descending=True)[:top].tolist()
    fig, axes = plt.subplots(1, 1 + len(most), figsize=(2.9 * (1 + len(most)), 3.5), squeeze=False)
    _draw_boxes(axes[0, 0], boxes, received)
    axes[0, 0].set_title("context given (mean over readers)", fontsize=9)
    for ax, r in zip(axes[0, 1:], most):
        _draw_boxes(ax, boxes, weights[r], colour=(0.1, 0.6, 0.2), outline=r)
        ax.set_title(f"what region {r} reads", fontsize=9)
    words = _words(dm, batch["tokens"][0], int(batch["lengths"][0]))
    fig.suptitle(f"{dm.splits['test']} image {image}: \"{' '.join(words)}\"  (visual CPC attention, CCCL Eq. 6)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("picture", choices=["attention", "context"])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--root", default=".cache/synthscenes")
    ap.add_argument("--split", default="test")
    ap.add_argument("--image", type=int, default=0)
    ap.add_argument("--caption", type=int, default=0, help="which of the image's captions (attention)")
    ap.add_argument("--labels", type=int, default=10, help="top predicted labels shown for CASC (attention)")
    ap.add_argument("--out", default=None, help="PNG path (default: <picture>.png)")
    args = ap.parse_args(argv)
    with one_line_errors():  # bad --image/--caption, missing boxes/checkpoint, a picture the model cannot draw
        _draw(args)


def _draw(args) -> None:
    model = load_module(args.ckpt)
    boxes = split_paths(args.root, args.split)["boxes"]
    if not boxes.exists():
        raise DataError(boxes, "file not found: pictures draw the region boxes",
                        "write the boxes with the features (`zoo-convert-tsv` does, from the bottom-up TSV)")
    dm = datamodule_for(model, args.root, args.split)
    if args.picture == "attention":
        fig = attention_figure(model, dm, args.image, args.caption, args.labels)
    else:
        fig = context_figure(model, dm, args.image)
    out = args.out or f"{args.picture}.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
