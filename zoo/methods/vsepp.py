"""VSE++ (Faghri et al., BMVC 2018): one vector per image and per caption, cosine, hardest-negative triplet.

Images: FC + l2 over one vector per image ({split}_ims.npy [N, F] is served as one region [N, 1, F]); on region
features the regions are averaged first (`image_pooling: mean`, a zoo switch: the official code has no region
input). Captions: one-direction GRU, the state at the last real word, l2. Score: the dot product of the two unit
vectors (official `measure cosine`). Loss: the shared hinge triplet, `hardest_negative` = the official
`--max_violation` (VSE++), off = VSE0 (the sum over negatives). Official code: fartashf/vsepp `python3` branch
@ dae4e1c (model.py:136-231 encoders, 234-291 similarity and loss; train.py:228 the lr schedule).
"""
from __future__ import annotations

import torch

from datamodules.errors import DataError

from ..blocks import GRULastStateEncoder, RegionEncoder
from ..blocks.functional import inner_products
from ..engine.module import Emb, RetrievalModule
from .official import ANY, check_opt, map_state, register_official, strip_module_prefix


class VSEPP(RetrievalModule):
    """VSE++.

    Args:
        vocab_size: None = taken from the datamodule at setup.
        feature_dim / embed_dim / word_dim / num_layers: official img_dim / embed_size / word_dim / num_layers.
        image_norm: l2 on the image embedding (official `not no_imgnorm`).
        use_abs: |embedding| after the l2 (official `--use_abs`, meant for order embeddings).
        image_pooling: how [B, R, F] region features become one vector: 'mean' over regions (R = 1: the vector).
    """

    def __init__(self, vocab_size: int | None = None, feature_dim: int = 4096, embed_dim: int = 1024,
                 word_dim: int = 300, num_layers: int = 1, image_norm: bool = True, use_abs: bool = False,
                 image_pooling: str = "mean", **loop_kwargs):
        super().__init__(**loop_kwargs)
        if image_pooling != "mean":
            raise ValueError(f"image_pooling must be 'mean', got {image_pooling!r}")
        self.save_hyperparameters()
        self.image_encoder = RegionEncoder(feature_dim, embed_dim, normalize=image_norm)
        self.text_encoder: GRULastStateEncoder | None = None
        if vocab_size is not None:
            self._build_text(vocab_size)

    def _build_text(self, vocab_size: int) -> None:
        hp = self.hparams
        self.text_encoder = GRULastStateEncoder(vocab_size, hp.word_dim, hp.embed_dim, hp.num_layers,
                                                use_abs=hp.use_abs)
        self.hparams["vocab_size"] = vocab_size

    def configure_from_data(self, datamodule) -> None:
        self.size_word_embedding(datamodule, self.text_encoder, self._build_text, self.OFFICIAL_VOCAB_HINT)

    def encode_images(self, batch: dict) -> Emb:
        x = batch["images"]
        if x.dim() == 3:  # [B, R, F]: one vector per image (R = 1 is the precomp vector itself)
            x = x[:, 0] if x.shape[1] == 1 else x.mean(1)
        v = self.image_encoder(x)
        return {"vector": v.abs() if self.hparams.use_abs else v}

    def encode_captions(self, batch: dict) -> Emb:
        if self.text_encoder is None:
            raise RuntimeError("VSEPP needs vocab_size (or a datamodule with a vocabulary) before encoding text")
        return {"vector": self.text_encoder(batch["tokens"], batch["lengths"])}

    def score(self, img: Emb, cap: Emb) -> torch.Tensor:
        return inner_products(img["vector"], cap["vector"])  # official cosine_sim (model.py:234-237), in fp32


#: the official opt settings (vsepp train.py:22-76) and what the zoo accepts
_VSEPP_OPT = {
    "margin": ANY, "word_dim": ANY, "embed_size": ANY, "num_layers": ANY, "img_dim": ANY, "max_violation": ANY,
    "no_imgnorm": ANY, "use_abs": ANY, "use_restval": ANY, "crop_size": ANY,
    "measure": ("cosine",),  # order embeddings (`--measure order`) are not in the zoo
    "finetune": (False,),  # the full CNN image encoder is not in the zoo: precomputed features only
    "cnn_type": ANY,  # read only by the full image encoder
}


@register_official("vsepp")
def import_vsepp(ckpt: dict, vocab=None) -> VSEPP:
    src = ckpt.get("_path")
    opt = check_opt(ckpt["opt"], _VSEPP_OPT, src)
    if not str(opt.get("data_name", "")).endswith("precomp"):
        raise DataError(src, f"data_name={opt.get('data_name')!r}: a checkpoint of the full-image (CNN) model",
                        "the zoo imports the precomputed-feature models (data_name *_precomp)")
    img_sd, txt_sd = ckpt["model"][:2]
    if len(ckpt["model"]) != 2:
        raise DataError(src, f"'model' holds {len(ckpt['model'])} state dicts, VSE++ saves 2 (img_enc, txt_enc)",
                        "pass a VSE++ checkpoint")
    vocab_size = int(opt.get("vocab_size") or strip_module_prefix(txt_sd)["embed.weight"].shape[0])
    m = VSEPP(vocab_size=vocab_size, feature_dim=int(opt["img_dim"]), embed_dim=int(opt["embed_size"]),
              word_dim=int(opt["word_dim"]), num_layers=int(opt["num_layers"]), image_norm=not opt["no_imgnorm"],
              use_abs=bool(opt["use_abs"]), margin=float(opt["margin"]), hardest_negative=bool(opt["max_violation"]),
              lr=float(opt.get("learning_rate", 2e-4)), lr_decay_epochs=int(opt.get("lr_update", 15)))
    map_state(img_sd, {"fc.": "fc."}, m.image_encoder, src)
    map_state(txt_sd, {"embed.": "embed.", "rnn.": "rnn."}, m.text_encoder, src)
    return m

