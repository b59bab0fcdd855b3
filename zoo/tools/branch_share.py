"""Per-branch share of CCCL's F on a split: `python -m zoo.tools.branch_share CKPT [--config RECIPE ...]`.

For each branch b of F = mean_b S^b (Eq. 32): the rsum of S^b alone, its positive-negative gap (mean score of
matched pairs minus mean of all others) and its share of F's gap, gap_b / sum_b gap_b (F's gap is the mean of
the branches' gaps). Also the learned CPC residual gains alpha (Eq. 7 reads 1). Data: the checkpoint's own
SynthScenes/precomp arguments, from the recipe configs given (the same ones as `lightning test`).
"""
from __future__ import annotations

import argparse

import torch
import yaml

from ..engine.evaluation import cat_embeddings
from ..engine.metrics import retrieval_metrics, twin_metrics
from ..methods.cccl import CCCL


def _data(configs: list[str]):
    import importlib

    cfg: dict = {}
    for path in configs:
        with open(path) as f:
            layer = yaml.safe_load(f).get("data", {})
        cfg["class_path"] = layer.get("class_path", cfg.get("class_path"))
        cfg.setdefault("init_args", {}).update(layer.get("init_args", {}))
    mod, _, name = cfg["class_path"].rpartition(".")
    args = dict(cfg["init_args"], num_workers=0)
    return getattr(importlib.import_module(mod), name)(**args)


@torch.no_grad()
def branch_share(model: CCCL, dm, split: str = "test") -> dict:
    dm.setup("test" if split == "test" else "validate")
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    model.eval()
    batches = list(loader)
    img = cat_embeddings([model.encode_images(b) for b in batches])
    cap = cat_embeddings([model.encode_captions(b) for b in batches])
    k = dm.caps_per_image
    n_img, n_cap = img["regions"].shape[0], cap["words"].shape[0]
    pos = torch.arange(n_cap)[None, :] // k == torch.arange(n_img)[:, None]
    per = {b: torch.empty(n_img, n_cap) for b in model.net.branches}
    for a in range(0, n_cap, 250):
        chunk = {kk: v[a : a + 250] for kk, v in cap.items()}
        w = max(int(chunk["n_words"].max()), 1)
        chunk = {kk: (v[:, :w] if v.dim() >= 3 else v) for kk, v in chunk.items()}
        for i in range(0, n_img, 50):
            ib = {kk: v[i : i + 50] for kk, v in img.items()}
            for b, s in model.net.branch_scores(ib, chunk).items():
                per[b][i : i + 50, a : a + 250] = s.float()
    gaps = {b: float(s[pos].mean() - s[~pos].mean()) for b, s in per.items()}
    total = sum(gaps.values())
    out = {b: {"rsum_alone": round(retrieval_metrics(s, k)["rsum"], 1), "gap": round(gaps[b], 4),
               "share": round(gaps[b] / total, 3) if total else float("nan")} for b, s in per.items()}
    F = torch.stack(list(per.values())).mean(0)
    out["F"] = {"rsum": round(retrieval_metrics(F, k)["rsum"], 1), "gap": round(total / len(per), 4)}
    if getattr(dm, "twins", False):  # twin scenes: which branch tells a caption's image from its mirror twin
        for b, s in [*per.items(), ("F", F)]:
            out[b]["twin_accuracy"] = round(twin_metrics(s, k)["twin_accuracy"], 1)
    gains = {}
    for name, cell in (("visual", model.net.visual.cpc), ("text", model.net.text.cpc)):
        if cell is not None:
            gains[name] = round(float(cell.alpha), 4)
    out["cpc_alpha"] = gains
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--config", action="append", required=True, help="the recipe(s) the checkpoint was tested with")
    ap.add_argument("--split", default="test", choices=["test", "dev"])
    a = ap.parse_args(argv)
    ck = torch.load(a.ckpt, map_location="cpu", weights_only=False)
    hp = {k: v for k, v in ck["hyper_parameters"].items() if k != "tokenizer_digest" and not k.startswith("_")}
    model = CCCL(**hp)  # (a development checkpoint may carry a since-removed tokenizer_digest hparam)
    model.load_state_dict(ck["state_dict"])
    model.on_load_checkpoint(ck)
    dm = _data(a.config)
    dm.prepare_data()
    model.configure_from_data(dm)
    print(yaml.safe_dump(branch_share(model, dm, a.split), sort_keys=False))


if __name__ == "__main__":
    main()
