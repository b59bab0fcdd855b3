"""VSE-infinity (Chen et al., CVPR 2021), the BiGRU text model on precomputed regions.

Images: FC(x) + MLP(x) per region (a two-layer BatchNorm MLP, the `basic` precomp encoder), GPO over the regions,
l2. Captions: word embeddings -> BiGRU, the two directions averaged per word, GPO over the words, l2. Score: the
dot product. Loss: the shared hinge triplet, the sum over negatives for the first `sum_negatives_epochs`
(official --vse_mean_warmup_epochs 1, "VSE0"), hardest after. Training-time augmentation as released: each region
kept with probability 0.8 (the kept ones moved to the front, zero-padded), and 20 % of the caption's tokens
(<start>/<end> included) changed: half of those to <mask> (the last embedding row), a tenth to a random id, the
rest deleted. AdamW (torch's default weight decay 0.01), lr /10 once at epoch lr_decay_epochs.
Official code: woodfrog/vse_infty `bigru` @ 8600f89 -- lib/encoders.py:56-83 (EncoderImageAggr), 130-160
(EncoderText), lib/vse.py:49-51 (AdamW), lib/datasets/image_caption.py:227-230 (region drop), 247-272 (caption
augmentation), 275-302 (collate), train.py:37-39 (<mask> row), 78-82 (warm-up), 251-261 (lr).
"""
from __future__ import annotations

import torch

from datamodules.errors import DataError
from datamodules.hub import resolve_pretrained

from ..blocks import GPO, BatchNormMLP, BiGRUTextEncoder, RegionEncoder, l2_normalize
from ..blocks.functional import inner_products
from ..engine.module import Emb, RetrievalModule
from .official import ANY, check_opt, map_state, register_official, strip_module_prefix


def drop_regions(images: torch.Tensor, keep_prob: float, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps each region with probability keep_prob: kept rows first (in order), zero-padded; -> (images, lengths).

    Official image_caption.py:227-230 (`image[np.where(rand > 0.20)]`) + the collate's zero padding; a set that
    would lose every region keeps its first one (the official code would crash on an empty set).
    """
    b, r, _ = images.shape
    keep = torch.rand(b, r, device=images.device, generator=generator) < keep_prob
    keep[:, 0] |= ~keep.any(1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept regions first, order kept
    lengths = keep.sum(1)
    out = images.gather(1, order[..., None].expand_as(images))
    out = out * (torch.arange(r, device=images.device)[None, :] < lengths[:, None])[..., None].to(out.dtype)
    return out[:, : int(lengths.max())], lengths


def augment_captions(tokens: torch.Tensor, lengths: torch.Tensor, vocab_size: int, mask_id: int, prob: float = 0.2,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The official caption augmentation (image_caption.py:247-272) on a padded id batch.

    Each token (<start>/<end> included) is picked with probability `prob`; a picked token becomes <mask> (50 %),
    a random id in [0, vocab_size) (10 %), or is deleted (40 %). A caption that would lose every token is kept.
    """
    c, n = tokens.shape
    dev = tokens.device
    real = torch.arange(n, device=dev)[None, :] < lengths[:, None]
    u = torch.rand(c, n, device=dev, generator=generator)
    picked = real & (u < prob)
    p = u / prob
    out = torch.where(picked & (p < 0.5), torch.full_like(tokens, mask_id), tokens)
    rand_ids = torch.randint(0, vocab_size, (c, n), device=dev, generator=generator)
    out = torch.where(picked & (p >= 0.5) & (p < 0.6), rand_ids, out)
    keep = real & ~(picked & (p >= 0.6))
    keep = torch.where(keep.any(1, keepdim=True), keep, real)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    new_len = keep.sum(1)
    out = out.gather(1, order) * (torch.arange(n, device=dev)[None, :] < new_len[:, None])
    return out[:, : int(new_len.max())], new_len


def augment_subwords(ids: torch.Tensor, mask: torch.Tensor, to_word: torch.Tensor, vocab_size: int, mask_id: int,
                     prob: float = 0.2, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The official BERT-side caption augmentation (master @ 29df9d6, lib/datasets/image_caption.py:239-272) on a
    padded sub-word batch ([CLS] ... [SEP], `mask` True on real positions, `to_word` the word each belongs to).

    Decided per *word* (the official loop runs over BasicTokenizer words and applies the choice to all of a word's
    sub-words): a word is picked with probability `prob`; a picked word's sub-words all become [MASK] (50 %), each a
    random id in [0, vocab_size) (10 %), or are all deleted (40 %). [CLS] and [SEP] are never touched (the official
    code adds them afterwards). -> (ids, mask), deletions closed up, order kept, trailing padding cut.
    """
    c, n = ids.shape
    dev = ids.device
    mask = mask.bool()
    pos = torch.arange(n, device=dev)[None, :]
    lengths = mask.sum(1)
    special = (pos == 0) | (pos == (lengths - 1)[:, None])
    words = to_word.clamp_min(0)
    u = torch.rand(c, int(words.max()) + 1, device=dev, generator=generator).gather(1, words)
    picked = mask & ~special & (u < prob)
    p = u / prob
    out = torch.where(picked & (p < 0.5), torch.full_like(ids, mask_id), ids)
    rand_ids = torch.randint(0, vocab_size, (c, n), device=dev, generator=generator)
    out = torch.where(picked & (p >= 0.5) & (p < 0.6), rand_ids, out)
    keep = mask & ~(picked & (p >= 0.6))
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    new_len = keep.sum(1)
    new_mask = pos < new_len[:, None]
    out = out.gather(1, order) * new_mask
    top = int(new_len.max())
    return out[:, :top], new_mask[:, :top]


class VSEInfinity(RetrievalModule):
    """VSE-infinity (BiGRU).

    Args:
        vocab_size: rows of the word embedding; None = the datamodule's vocabulary + 1 (the <mask> row, as the
            official train.py adds it). The <mask> id is vocab_size - 1.
        feature_dim / embed_dim / word_dim / num_layers: official img_dim / embed_size / word_dim / num_layers.
        gpo_dim: GPO's position-encoding and hidden size (32, fixed in the official code).
        image_norm / text_norm: l2 of the pooled embeddings (official not no_imgnorm / not no_txtnorm).
        region_keep: training-time probability to keep each region (0.8; 1 = off).
        caption_augment: training-time share of tokens masked / replaced / deleted (0.2; 0 = off).
        optimizer: 'adamw' (official, weight_decay 0.01) or 'adam'; lr_decay_epochs: the one /10 step
            (official lr_update: lr_schedules = [lr_update]).
    """

    def __init__(self, vocab_size: int | None = None, feature_dim: int = 2048, embed_dim: int = 1024,
                 word_dim: int = 300, num_layers: int = 1, gpo_dim: int = 32, image_norm: bool = True,
                 text_norm: bool = True, region_keep: float = 0.8, caption_augment: float = 0.2,
                 optimizer: str = "adamw", weight_decay: float = 0.01, **loop_kwargs):
        loop_kwargs.setdefault("lr", 5e-4)
        loop_kwargs.setdefault("sum_negatives_epochs", 1)
        super().__init__(**loop_kwargs)
        if optimizer not in ("adamw", "adam"):
            raise ValueError(f"optimizer must be 'adamw' or 'adam', got {optimizer!r}")
        self.save_hyperparameters()
        self.image_encoder = RegionEncoder(feature_dim, embed_dim, normalize=False)  # Xavier fc (encoders.py:67-73)
        self.image_mlp = BatchNormMLP(feature_dim, embed_dim // 2, embed_dim, 2)
        self.image_pool = GPO(gpo_dim, gpo_dim)
        self.text_encoder: BiGRUTextEncoder | None = None
        self.text_pool = GPO(gpo_dim, gpo_dim)
        if vocab_size is not None:
            self._build_text(vocab_size)

    def _build_text(self, vocab_size: int) -> None:
        hp = self.hparams
        self.text_encoder = BiGRUTextEncoder(vocab_size, hp.word_dim, hp.embed_dim, hp.num_layers, normalize=False)
        self.hparams["vocab_size"] = vocab_size

    def configure_from_data(self, datamodule) -> None:
        size = datamodule.vocab_size
        if self.text_encoder is None:
            self._build_text(size + 1)  # + the <mask> row
        elif self.text_encoder.embed.num_embeddings not in (size, size + 1):
            raise DataError(datamodule.vocab_path, f"the model's embedding has {self.text_encoder.embed.num_embeddings} "
                            f"rows (its vocabulary + <mask>) but this vocabulary has {size} words",
                            "use the vocabulary the model was trained with (data.vocab_path)")

    # ---- encoders -----------------------------------------------------------------------------------------
    def encode_images(self, batch: dict) -> Emb:
        x = batch["images"]
        lengths = batch.get("image_lengths")
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        feats = self.image_encoder(x) + self.image_mlp(x)  # official encoders.py:76-79
        pooled, _ = self.image_pool(feats, lengths)
        return {"vector": l2_normalize(pooled) if self.hparams.image_norm else pooled}

    def encode_captions(self, batch: dict) -> Emb:
        if self.text_encoder is None:
            raise RuntimeError("VSEInfinity needs vocab_size (or a datamodule with a vocabulary) before encoding text")
        words = self.text_encoder(batch["tokens"], batch["lengths"])
        pooled, _ = self.text_pool(words, batch["lengths"])
        return {"vector": l2_normalize(pooled) if self.hparams.text_norm else pooled}

    def score(self, img: Emb, cap: Emb) -> torch.Tensor:
        return inner_products(img["vector"], cap["vector"])  # official lib/loss.py get_sim, in fp32

    # ---- training ---------------------------------------------------------------------------------------------
    def augment(self, batch: dict) -> dict:
        hp = self.hparams
        batch = dict(batch)
        if hp.region_keep < 1:
            batch["images"], batch["image_lengths"] = drop_regions(batch["images"], hp.region_keep)
        if hp.caption_augment > 0 and self.text_encoder is not None:
            rows = self.text_encoder.embed.num_embeddings
            batch["tokens"], batch["lengths"] = augment_captions(batch["tokens"], batch["lengths"], rows, rows - 1,
                                                                 hp.caption_augment)
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return super().training_step(self.augment(batch), batch_idx)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.lr_decay_epochs:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[self.lr_decay_epochs], gamma=self.lr_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


#: the official opt settings (vse_infty bigru arguments.py) and what the zoo accepts
_VSEINF_OPT = {
    "margin": ANY, "word_dim": ANY, "embed_size": ANY, "num_layers": ANY, "img_dim": ANY, "max_violation": ANY,
    "no_imgnorm": ANY, "no_txtnorm": ANY, "vse_mean_warmup_epochs": ANY,
    "precomp_enc_type": ("basic",),  # 'backbone' (the grid model on raw images) is not in the zoo
    "optim": ("adam",),  # vse.py:49-53: 'adam' = AdamW, anything else raises there too
    # read only by the backbone model / raw-image dataset, or never (drop: the augmentation follows train mode)
    "backbone_path": ANY, "backbone_source": ANY, "backbone_warmup_epochs": ANY, "embedding_warmup_epochs": ANY,
    "backbone_lr_factor": ANY, "input_scale_factor": ANY, "drop": ANY,
}

# official key -> zoo key (image side; `mlp.bns.1` is built by the official MLP but never used by its forward)
_IMG_MAP = {"fc.": "image_encoder.fc.", "mlp.layers.": "image_mlp.layers.", "mlp.bns.0.": "image_mlp.bns.0.",
            "mlp.bns.1.": None, "gpool.": "image_pool."}
_TXT_MAP = {"embed.": "text_encoder.embed.", "rnn.": "text_encoder.rnn.", "gpool.": "text_pool."}


@register_official("vse_infinity")
def import_vse_infinity(ckpt: dict, vocab=None) -> VSEInfinity:
    src = ckpt.get("_path")
    opt = check_opt(ckpt["opt"], _VSEINF_OPT, src)
    if len(ckpt["model"]) != 2:
        raise DataError(src, f"'model' holds {len(ckpt['model'])} state dicts, VSE-infinity saves 2 (img_enc, txt_enc)",
                        "pass a VSE-infinity checkpoint (bigru branch)")
    img_sd, txt_sd = (strip_module_prefix(sd) for sd in ckpt["model"])
    if any(k.startswith("bert.") or k.startswith("linear.") for k in txt_sd):
        raise DataError(src, "the text encoder is BERT (the official master branch)",
                        "import it as vse_infinity_bert")
    vocab_size = int(opt.get("vocab_size") or txt_sd["embed.weight"].shape[0])
    m = VSEInfinity(vocab_size=vocab_size, feature_dim=int(opt["img_dim"]), embed_dim=int(opt["embed_size"]),
                    word_dim=int(opt["word_dim"]), num_layers=int(opt["num_layers"]),
                    gpo_dim=int(img_sd["gpool.linear.weight"].shape[1]), image_norm=not opt["no_imgnorm"],
                    text_norm=not opt["no_txtnorm"], margin=float(opt["margin"]),
                    sum_negatives_epochs=int(opt.get("vse_mean_warmup_epochs", 1)),
                    lr=float(opt.get("learning_rate", 5e-4)), lr_decay_epochs=int(opt.get("lr_update", 15)))
    # one state dict for the whole module: every zoo key filled by exactly one official key
    merged = {f"img.{k}": v for k, v in img_sd.items()} | {f"txt.{k}": v for k, v in txt_sd.items()}
    mapping = {f"img.{a}": b for a, b in _IMG_MAP.items()} | {f"txt.{a}": b for a, b in _TXT_MAP.items()}
    map_state(merged, mapping, m, src)
    return m


class VSEInfinityBert(VSEInfinity):
    """VSE-infinity with the BERT text encoder (official `master` branch @ 29df9d6, lib/encoders.py:165-191):
    BERT over the caption's sub-words ([CLS] ... [SEP], attention mask = ids != 0), Linear(hidden -> d), GPO over
    all sub-word positions (lengths = sub-word count), l2. AdamW over three groups as vse.py:48-63: BERT at 0.1 x
    lr, weight decay 1e-4 for all.

    Args:
        bert: a transformers model name or folder (e.g. bert-base-uncased); or
        bert_config: a BertConfig as a dict (what the importer stores, so an imported checkpoint needs no download).
        bert_lr_factor: BERT's learning-rate factor (0.1 official).
        subword_augment: the official training-time caption augmentation on sub-words, per word (augment_subwords:
            0.2 official, 0 = off); region drop (region_keep) is as in VSEInfinity.
    Batches: `subword_ids` / `subword_mask` / `subword_to_word` from the datamodule (data.subword_tokenizer), or
    `tokens` / `lengths` holding the official BERT ids directly (the load_official contract; no augmentation).
    """

    uses_vocabulary = False

    def __init__(self, bert: str | None = "bert-base-uncased", bert_config: dict | None = None,
                 bert_lr_factor: float = 0.1, feature_dim: int = 2048, embed_dim: int = 1024, gpo_dim: int = 32,
                 image_norm: bool = True, text_norm: bool = True, region_keep: float = 0.8,
                 weight_decay: float = 1e-4, subword_augment: float = 0.2, **loop_kwargs):
        if not 0 <= subword_augment < 1:
            raise ValueError(f"subword_augment must lie in [0, 1), got {subword_augment!r}")
        for fixed in ("vocab_size", "word_dim", "num_layers", "optimizer", "caption_augment"):
            loop_kwargs.pop(fixed, None)  # VSEInfinity's BiGRU-side settings (saved with the hparams): fixed here
        super().__init__(vocab_size=None, feature_dim=feature_dim, embed_dim=embed_dim, gpo_dim=gpo_dim,
                         image_norm=image_norm, text_norm=text_norm, region_keep=region_keep, caption_augment=0.0,
                         optimizer="adamw", weight_decay=weight_decay, **loop_kwargs)
        self.save_hyperparameters()
        from transformers import AutoModel, BertConfig, BertModel

        if bert_config is not None:
            self.bert = BertModel(BertConfig(**bert_config), add_pooling_layer=True)
        else:
            try:
                self.bert = AutoModel.from_pretrained(resolve_pretrained(bert))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"cannot load the BERT model {bert!r} ({type(e).__name__}: {e}); give a local "
                                 "folder with a transformers model, or import an official checkpoint") from None
        # from_pretrained returns eval mode and Lightning keeps submodule modes: without this BERT fine-tunes with its
        # dropout off, where the official loop switches both encoders to train mode (lib/vse.py, VSEModel.train_start)
        self.bert.train()
        self.text_linear = torch.nn.Linear(self.bert.config.hidden_size, embed_dim)

    @property
    def required_inputs(self):
        return ("subwords",)

    def configure_from_data(self, datamodule) -> None:
        # the text side reads sub-word ids, not the zoo's vocabulary; the augmentation needs the tokenizer's [MASK]
        tok = getattr(datamodule, "subword_tokenizer_obj", None)
        if tok is not None:
            self.subword_mask_id, self.subword_vocab = tok.mask_token_id, len(tok)

    def augment(self, batch: dict) -> dict:
        """Region drop (VSEInfinity.augment) and the official sub-word augmentation (augment_subwords)."""
        batch = super().augment(batch)
        rate = self.hparams.subword_augment
        if rate > 0 and "subword_ids" in batch:
            mask_id = getattr(self, "subword_mask_id", None)
            if mask_id is None:
                raise ValueError("model.subword_augment masks sub-words with the tokenizer's mask token, but the "
                                 "data's sub-word tokenizer has none (or is not set): use a BERT tokenizer, or set "
                                 "model.init_args.subword_augment: 0")
            batch["subword_ids"], batch["subword_mask"] = augment_subwords(
                batch["subword_ids"], batch["subword_mask"], batch["subword_to_word"], self.subword_vocab, mask_id, rate)
        return batch

    def encode_captions(self, batch: dict) -> Emb:
        if "subword_ids" in batch:
            ids, mask = batch["subword_ids"], batch["subword_mask"].bool()
            lengths = mask.sum(1)
        else:
            ids, lengths = batch["tokens"], batch["lengths"]
            mask = ids != 0  # official: bert_attention_mask = (x != 0)
        hidden = self.bert(input_ids=ids, attention_mask=mask.float())[0]
        pooled, _ = self.text_pool(self.text_linear(hidden), lengths)
        return {"vector": l2_normalize(pooled) if self.hparams.text_norm else pooled}

    def configure_optimizers(self):
        bert = list(self.bert.parameters())
        ids = {id(p) for p in bert}
        rest = [p for p in self.parameters() if id(p) not in ids]
        opt = torch.optim.AdamW([{"params": rest, "lr": self.lr},
                                 {"params": bert, "lr": self.lr * self.hparams.bert_lr_factor}],
                                lr=self.lr, weight_decay=self.hparams.weight_decay)
        if not self.lr_decay_epochs:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[self.lr_decay_epochs], gamma=self.lr_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _bert_config(sd: dict) -> dict:
    """The BertConfig of an official BERT state dict, from its shapes (heads: hidden / 64, as every BERT release)."""
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("bert.encoder.layer.")}
    hidden = sd["bert.embeddings.word_embeddings.weight"].shape[1]
    return {"vocab_size": int(sd["bert.embeddings.word_embeddings.weight"].shape[0]), "hidden_size": int(hidden),
            "num_hidden_layers": len(layers), "num_attention_heads": max(1, int(hidden) // 64),
            "intermediate_size": int(sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
            "max_position_embeddings": int(sd["bert.embeddings.position_embeddings.weight"].shape[0]),
            "type_vocab_size": int(sd["bert.embeddings.token_type_embeddings.weight"].shape[0])}


@register_official("vse_infinity_bert")
def import_vse_infinity_bert(ckpt: dict, vocab=None) -> VSEInfinityBert:
    src = ckpt.get("_path")
    spec = {k: v for k, v in _VSEINF_OPT.items() if k != "drop"}
    opt = check_opt(ckpt["opt"], spec, src)
    if len(ckpt["model"]) != 2:
        raise DataError(src, f"'model' holds {len(ckpt['model'])} state dicts, VSE-infinity saves 2 (img_enc, txt_enc)",
                        "pass a VSE-infinity checkpoint (master branch)")
    img_sd, txt_sd = (strip_module_prefix(sd) for sd in ckpt["model"])
    if "bert.embeddings.word_embeddings.weight" not in txt_sd:
        raise DataError(src, "the text encoder is not BERT (no bert.* keys)", "import a BiGRU model as vse_infinity")
    buffers = [k for k in txt_sd if k.endswith("position_ids")]  # a buffer some transformers versions save
    m = VSEInfinityBert(bert=None, bert_config=_bert_config(txt_sd), feature_dim=int(opt["img_dim"]),
                        embed_dim=int(opt["embed_size"]), gpo_dim=int(img_sd["gpool.linear.weight"].shape[1]),
                        image_norm=not opt["no_imgnorm"], text_norm=not opt["no_txtnorm"], margin=float(opt["margin"]),
                        sum_negatives_epochs=int(opt.get("vse_mean_warmup_epochs", 1)),
                        lr=float(opt.get("learning_rate", 5e-4)), lr_decay_epochs=int(opt.get("lr_update", 15)))
    merged = {f"img.{k}": v for k, v in img_sd.items()} | {f"txt.{k}": v for k, v in txt_sd.items()}
    mapping = {f"img.{a}": b for a, b in _IMG_MAP.items()} | {"txt.bert.": "bert.", "txt.linear.": "text_linear.",
                                                            "txt.gpool.": "text_pool."}
    mapping |= {f"txt.{k}": None for k in buffers}  # fixed arange buffers, rebuilt by transformers
    own = set(m.state_dict())
    missing_ok = {k for k in own if k.endswith("position_ids") or k.endswith("token_type_ids")}
    if missing_ok:  # registered buffers of this transformers version that the official file may lack
        for k in missing_ok:
            if f"txt.{k}" not in merged:
                merged[f"txt.{k}"] = m.state_dict()[k]
        mapping |= {f"txt.{k}": k for k in missing_ok}
    map_state(merged, mapping, m, src)
    return m
