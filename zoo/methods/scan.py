"""SCAN (Lee et al., ECCV 2018): t-i and i-t stacked cross attention, AVG or LSE pooling -- presets of CASC-base.

SCAN's model is CASC-base's network with one direction: regions FC + l2, words BiGRU (directions averaged) + l2,
LeakyReLU(0.1)-l2 scores normalised over the query items, softmax (lambda_softmax) over the context items, cosine of
each query item with its attended vector, pooled by the mean (AVG) or LogSumExp (LSE, lambda_lse). So SCAN is
`zoo.methods.CASCBase(direction='t2i'|'i2t', aggregation='mean'|'lse', ...)`, with the settings of SCAN's README per
dataset in recipes/scan_{t2i,i2t}_{avg,lse}_{f30k,coco,synth}.yaml (`PRESETS` below), and SCAN* (the paper's
ensemble of t-i and i-t) is `python -m zoo.experiments.ensemble --ckpt T2I.ckpt I2T.ckpt`.
Official code: kuanghuei/SCAN @ 8063557 (model.py:178-333 attention and scores, 134-175 the text encoder,
57-97 the image encoder; train.py:30-92 the settings, 266-271 the lr schedule; README.md "Training new models").
The importers `scan_t2i` / `scan_i2t` read SCAN's checkpoints ({'model': [img_enc, txt_enc], 'opt', ...}).
"""
from __future__ import annotations

from datamodules.errors import DataError

from .casc_base import CASCBase
from .official import ANY, check_opt, map_state, register_official, strip_module_prefix

#: SCAN README, "Arguments used to train" (Flickr30K: 30 epochs, lr 2e-4 /10 at 15 = the train.py defaults;
#: MS-COCO: 20 epochs, lr 5e-4 /10 at 10). lambda_softmax 9 (t-i) / 4 (i-t); lambda_lse 6 (t-i), 5 / 20 (i-t).
PRESETS = {
    ("t2i", "lse", "f30k"): {"lambda_softmax": 9.0, "lambda_lse": 6.0},
    ("t2i", "avg", "f30k"): {"lambda_softmax": 9.0},
    ("i2t", "lse", "f30k"): {"lambda_softmax": 4.0, "lambda_lse": 5.0},
    ("i2t", "avg", "f30k"): {"lambda_softmax": 4.0},
    ("t2i", "lse", "coco"): {"lambda_softmax": 9.0, "lambda_lse": 6.0},
    ("t2i", "avg", "coco"): {"lambda_softmax": 9.0},
    ("i2t", "lse", "coco"): {"lambda_softmax": 4.0, "lambda_lse": 20.0},
    ("i2t", "avg", "coco"): {"lambda_softmax": 4.0},
}
SCHEDULES = {"f30k": {"num_epochs": 30, "lr_update": 15, "learning_rate": 2e-4},
             "coco": {"num_epochs": 20, "lr_update": 10, "learning_rate": 5e-4}}

#: SCAN's raw_feature_norm -> zoo.blocks.functional.normalize_scores (the ones whose formula is the same)
_NORMS = {"clipped_l2norm": "clipped_l2", "l2norm": "l2", "no_norm": "none"}
_AGGS = {"LogSumExp": "lse", "Mean": "mean"}

#: the official opt settings (SCAN train.py:30-92) and what the zoo accepts
_SCAN_OPT = {
    "margin": ANY, "word_dim": ANY, "embed_size": ANY, "img_dim": ANY, "max_violation": ANY, "lambda_lse": ANY,
    "lambda_softmax": ANY, "num_layers": ANY, "cross_attn": ("t2i", "i2t"),
    "no_imgnorm": (False,), "no_txtnorm": (False,),  # CASC-base always l2-normalises both sides
    "raw_feature_norm": tuple(_NORMS),  # SCAN's l1norm/clipped_l1norm/softmax/clipped variants are not mapped
    "agg_func": tuple(_AGGS),  # Max and Sum pooling are not in the zoo
    "precomp_enc_type": ("basic",),  # weight_norm's FC is not in the zoo
    "bi_gru": (True,),  # the README's models are all --bi_gru; the one-direction GRU is not in CASC-base
}


def scan_model(direction: str, agg: str, lambda_softmax: float, lambda_lse: float = 6.0, **kwargs) -> CASCBase:
    """A SCAN t-i / i-t model with AVG ('mean') or LSE ('lse') pooling: CASCBase with one direction."""
    if direction not in ("t2i", "i2t"):
        raise ValueError(f"SCAN's direction is 't2i' or 'i2t', got {direction!r}")
    lam = {"lambda_t2i": lambda_softmax} if direction == "t2i" else {"lambda_i2t": lambda_softmax}
    return CASCBase(direction=direction, aggregation=agg, lse_temperature=lambda_lse, **lam, **kwargs)


def _import_scan(ckpt: dict, direction: str) -> CASCBase:
    src = ckpt.get("_path")
    opt = check_opt(ckpt["opt"], _SCAN_OPT, src)
    if opt["cross_attn"] != direction:
        raise DataError(src, f"the checkpoint is a SCAN {opt['cross_attn']} model (opt.cross_attn), not {direction}",
                        f"use the importer scan_{opt['cross_attn']}")
    if len(ckpt["model"]) != 2:
        raise DataError(src, f"'model' holds {len(ckpt['model'])} state dicts, SCAN saves 2 (img_enc, txt_enc)",
                        "pass a SCAN checkpoint")
    if int(opt["num_layers"]) != 1:
        raise DataError(src, f"num_layers={opt['num_layers']}: CASC-base's text encoder has one BiGRU layer",
                        "import a checkpoint trained with --num_layers 1 (SCAN's default)")
    img_sd, txt_sd = ckpt["model"]
    vocab_size = int(opt.get("vocab_size") or strip_module_prefix(txt_sd)["embed.weight"].shape[0])
    m = scan_model(direction, _AGGS[opt["agg_func"]], float(opt["lambda_softmax"]), float(opt["lambda_lse"]),
                   vocab_size=vocab_size, feature_dim=int(opt["img_dim"]), embed_dim=int(opt["embed_size"]),
                   word_dim=int(opt["word_dim"]), score_norm=_NORMS[opt["raw_feature_norm"]],
                   margin=float(opt["margin"]), hardest_negative=bool(opt["max_violation"]),
                   lr=float(opt.get("learning_rate", 2e-4)), lr_decay_epochs=int(opt.get("lr_update", 15)))
    map_state(img_sd, {"fc.": "fc."}, m.image_encoder, src)
    map_state(txt_sd, {"embed.": "embed.", "rnn.": "rnn."}, m.text_encoder, src)
    return m


@register_official("scan_t2i")
def import_scan_t2i(ckpt: dict, vocab=None) -> CASCBase:
    return _import_scan(ckpt, "t2i")


@register_official("scan_i2t")
def import_scan_i2t(ckpt: dict, vocab=None) -> CASCBase:
    return _import_scan(ckpt, "i2t")
