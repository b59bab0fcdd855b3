"""CCCL (Applied Soft Computing 2024): context-perceived embeddings, three branches, hybrid loss.

A thin RetrievalModule over `CCCLNet` (model.py). Every Table 6 ablation is a switch:
  w/o V-CPC use_visual_cpc=false | w/o T-CPC use_text_cpc=false | w/o CPC both false
  w/o POS (box *position*, not part of speech) use_box_position=false | w/o BERT text_encoder=bigru
  w/o B-1/B-2/B-3 use_global_branch / use_local_branch / use_relational_branch=false
  w/o VSF use_vsf=false | w/o A-Pool use_avg_pool=false | w/o M-Pool use_max_pool=false
  w/o S-NLP use_dependency_graph=false | w/o C-GRU use_context_gru=false
  w/o SC-loss coherence_weight=0 | w/o MLP scorer=linear
plus sim_dim (P, Figs. 4-5) and coherence_weight (lambda, Table 5).
"""
from __future__ import annotations

import hashlib
import json

import torch

from datamodules.errors import DataError

from ...blocks.coherence import hybrid_loss
from ...blocks.functional import l2_normalize, wide
from ...blocks.vsf import fuse_scores
from ...engine.module import Emb, RetrievalModule
from .model import CCCLNet


def tokenizer_digest(tok) -> str:
    """sha1 (16 hex) of a transformers tokenizer's identity: its vocabulary in id order, casing and class family."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    lower = getattr(tok, "do_lower_case", None)
    if lower is None:
        lower = tok.init_kwargs.get("do_lower_case")
    key = json.dumps({"vocab": vocab, "lower_case": lower}, ensure_ascii=False)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


class CCCL(RetrievalModule):
    """CCCL. Paper settings (Table 1, Sec. 4.2): d = 1024, P = 256, lambda = 0.5 (Flickr30K) / 0.75 (COCO),
    margin 0.2, Adam 2e-4 for 15 epochs then 2e-5 (the printed "decayed by 10%" contradicts its own 0.00002),
    30 epochs, batch 128, best epoch by validation rsum.

    Args:
        feature_dim / embed_dim (d) / sim_dim (P).
        text_encoder: 'bert' (pretrained transformers model `bert_model`: a hub name or a local folder; the data
            must serve its sub-words, data.subword_tokenizer = the same name) or 'bigru' ("w/o BERT", CASC's
            BiGRU over 300-d word embeddings, needs vocab_size or a datamodule).
        bert_finetune / bert_lr: the paper does not say whether BERT is fine-tuned; default: fine-tuned with its
            own learning rate 2e-5 (the usual choice for this family). False freezes it.
        subword_pooling: 'mean' (default) or 'first' sub-word of each word.
        use_box_position / position_tuple: CCCL Eq. (9) and our completion of its six-tuple (blocks.cpc).
        position_fusion: 'product' (default), Eq. (10)'s Q^ o S^ as printed, or 'sum', Q^ + (S^ - 1/2) (an additive
            reading; on twin scenes it does not learn the boxes, where the product does: README, Box positions on
            twin scenes).
        attention_smooth: inverse temperature of Eq. (17)'s softmax (unvalued in the paper, 9 as SCAN/CASC);
            not the loss weight.
        gcn_layers / edge_norm: Eq. (24)'s residual GCN layers and the affinity normalisation (blocks.graph).
        coherence_weight: lambda of Eq. (34). coherence_reduction: 'mean' over the b^2 pairs (default) or 'sum' as
            printed in Eq. (31); with 'sum' the coherence term flattens every score at the start, before the triplet
            term can separate them, and nothing is learned (observed on SynthScenes, loss stuck at b(b-1) x margin).
        eval_pair_budget: floats of per-pair intermediates per scoring chunk (bounds evaluation memory).
        cpc_gain: 'learned' (default) CPC(Y) = alpha A^ + Y with alpha started at 0, or 'one', Eq. (7) as printed.
        text_fc_init: 'xavier' (default, zero bias, as SGRAF) or torch's 'default' for Eq. (11)'s FC.
        bigru_l2: l2-normalise the BiGRU's word states ("w/o BERT"; CASC's/SGRAF's convention), default True.
        margin_per_branch: Eq. (33)'s margin divided by the number of branches averaged in F (default), or on F as
            printed (False). sum_negatives_epochs (default 1): the warm-up on the sum over all negatives before
            Eq. (33)'s hardest negatives. README "Why CCCL was slow" measures each of these.
    A BERT checkpoint stores its tokenizer's identity (tokenizer_digest: sha1 of the sub-word vocabulary in id order
    and its casing); testing or resuming with data served by another tokenizer is an error (issue 19).
    """

    def __init__(self, vocab_size: int | None = None, feature_dim: int = 2048, embed_dim: int = 1024,
                 sim_dim: int = 256, text_encoder: str = "bert", bert_model: str = "bert-base-uncased",
                 bert_finetune: bool = True, bert_lr: float = 2e-5, subword_pooling: str = "mean",
                 word_dim: int = 300, use_visual_cpc: bool = True, use_text_cpc: bool = True,
                 use_box_position: bool = True, position_tuple: str = "corners_area_aspect",
                 use_global_branch: bool = True, use_local_branch: bool = True, use_relational_branch: bool = True,
                 use_vsf: bool = True, use_avg_pool: bool = True, use_max_pool: bool = True,
                 use_dependency_graph: bool = True, use_context_gru: bool = True, gcn_layers: int = 1,
                 edge_norm: str = "softmax", scorer: str = "mlp", attention_smooth: float = 9.0,
                 coherence_weight: float = 0.5, coherence_reduction: str = "mean", eval_pair_budget: int = 2 ** 26,
                 cpc_gain: str = "learned", text_fc_init: str = "xavier", bigru_l2: bool = True,
                 margin_per_branch: bool = True, position_fusion: str = "product", **loop_kwargs):
        loop_kwargs.setdefault("lr", 2e-4)
        loop_kwargs.setdefault("lr_decay_epochs", 15)
        loop_kwargs.setdefault("sum_negatives_epochs", 1)  # warm-up: sum over negatives for epoch 1, Eq. (33) after
        if coherence_weight < 0:
            raise ValueError(f"coherence_weight (lambda of Eq. 34) must be >= 0 (0 = w/o SC-loss), got {coherence_weight}")
        super().__init__(**loop_kwargs)
        self.save_hyperparameters()
        self.net = CCCLNet(
            feature_dim=feature_dim, embed_dim=embed_dim, sim_dim=sim_dim, text_encoder=text_encoder,
            bert_model=bert_model, bert_finetune=bert_finetune, subword_pooling=subword_pooling, vocab_size=vocab_size,
            word_dim=word_dim, use_visual_cpc=use_visual_cpc, use_text_cpc=use_text_cpc,
            use_box_position=use_box_position, position_tuple=position_tuple, use_global_branch=use_global_branch,
            use_local_branch=use_local_branch, use_relational_branch=use_relational_branch, use_vsf=use_vsf,
            use_avg_pool=use_avg_pool, use_max_pool=use_max_pool, use_dependency_graph=use_dependency_graph,
            use_context_gru=use_context_gru, gcn_layers=gcn_layers, edge_norm=edge_norm, scorer=scorer,
            attention_smooth=attention_smooth, pair_budget=eval_pair_budget, cpc_gain=cpc_gain,
            text_fc_init=text_fc_init, bigru_l2=bigru_l2, position_fusion=position_fusion)

    tokenizer_digest: str | None = None  # the training data's sub-word tokenizer (BERT only), kept in checkpoints
    tokenizer_source: str | None = None

    @property
    def required_inputs(self) -> tuple[str, ...]:
        hp = self.hparams
        req = []
        if hp.use_box_position:
            req.append("boxes")
        if hp.text_encoder == "bert":
            req.append("subwords")
        if "relational" in self.net.branches and hp.use_dependency_graph:
            req.append("graphs")
        return tuple(req)

    @property
    def uses_vocabulary(self) -> bool:  # the BERT encoder reads sub-words, not the zoo's word ids
        return self.hparams.text_encoder == "bigru"

    def check_data(self, datamodule) -> None:
        if self.hparams.use_box_position and not getattr(datamodule, "with_boxes", False):
            raise DataError(None, "CCCL uses region box positions (Eq. 9) but the datamodule does not serve boxes",
                            "set data.with_boxes: true ({split}_boxes.npy beside the features; from a bottom-up TSV "
                            "write both with `zoo-convert-tsv`), or run without position features: "
                            "model.use_box_position: false")
        super().check_data(datamodule)

    def configure_from_data(self, datamodule) -> None:
        hp = self.hparams
        if hp.text_encoder == "bigru":
            def build(size: int) -> None:
                self.net.build_bigru(size)
                self.hparams["vocab_size"] = size  # so checkpoints rebuild the same model

            self.size_word_embedding(datamodule, self.net.bigru, build)
        else:
            tok = getattr(datamodule, "subword_tokenizer_obj", None)
            n_model = int(self.net.bert.backbone.config.vocab_size)
            if tok is not None and len(tok) > n_model:
                raise DataError(None, f"data.subword_tokenizer ({datamodule.subword_tokenizer}) has {len(tok)} sub-words but "
                                f"model.bert_model ({hp.bert_model}) knows {n_model}", "give both the same model")
            if tok is not None:
                self.tokenizer_source = str(datamodule.subword_tokenizer)
                self.check_tokenizer(tokenizer_digest(tok), self.tokenizer_source, self.tokenizer_digest)
                self.tokenizer_digest = tokenizer_digest(tok)

    @staticmethod
    def check_tokenizer(data_digest: str | None, data_source: str | None, trained_digest: str | None) -> None:
        """Refuses sub-words from another tokenizer than the checkpoint's (other vocabulary, order or casing)."""
        if data_digest is None or trained_digest is None or data_digest == trained_digest:
            return
        raise DataError(data_source, f"this sub-word tokenizer (digest {data_digest}) is not the one the checkpoint was "
                        f"trained with (digest {trained_digest}): its vocabulary or casing differs, so every "
                        "sub-word id would mean another piece", "set data.subword_tokenizer to the tokenizer the "
                        "model was trained with (the training recipe's data.subword_tokenizer)")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["zoo_data"]["tokenizer_digest"] = self.tokenizer_digest

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = (checkpoint.get("zoo_data") or {}).get("tokenizer_digest")
        if saved is not None:  # set at setup when data are attached (test, fit resume): compare, else adopt
            self.check_tokenizer(self.tokenizer_digest, self.tokenizer_source, saved)
            self.tokenizer_digest = saved

    # ---- RetrievalModule --------------------------------------------------------------------------
    def encode_images(self, batch: dict) -> Emb:
        return self.net.encode_images(batch["images"], batch.get("boxes"))

    def encode_captions(self, batch: dict) -> Emb:
        return self.net.encode_captions(batch)

    def score(self, img: Emb, cap: Emb) -> torch.Tensor:
        return self.net.score(img, cap)

    def global_embedding(self, emb: Emb, side: str) -> torch.Tensor:
        """zoo.search's first stage: the global branch's own vectors v^S / t^S (Eqs. (13)-(14)), l2-normalised, where
        that branch is on (on SynthScenes they beat the mean of regions / words at small `rerank`: README, Search);
        the default mean otherwise."""
        if "global" in emb:
            return l2_normalize(wide(emb["global"]))
        return super().global_embedding(emb, side)

    def training_losses(self, batch: dict, img: Emb, cap: Emb) -> dict[str, torch.Tensor]:
        """L = L_t(F) + lambda L_c(S^S, S^O, S^R), Eqs. (29)-(34), on the batch's b x b pairs."""
        hp = self.hparams
        scores = self.net.branch_scores(img, cap)
        return hybrid_loss(fuse_scores(scores), scores, self.triplet_margin, hp.coherence_weight,
                           self.use_hardest_negative, batch["image_ids"], hp.coherence_reduction)

    @property
    def triplet_margin(self) -> float:
        """The margin of Eq. (33) on F: `margin` / (branches averaged in F) with margin_per_branch (default), so each
        branch is asked for `margin` as in a one-score model; `margin` on F itself as printed otherwise."""
        return self.margin / len(self.net.branches) if self.hparams.margin_per_branch else self.margin

    def configure_optimizers(self):
        """Adam at `lr` (2e-4), a fine-tuned BERT at `bert_lr`, both divided by 10 every lr_decay_epochs (15)."""
        bert = self.net.bert.backbone if self.net.bert is not None else None
        bert_ids = {id(p) for p in bert.parameters()} if bert is not None else set()
        rest = [p for p in self.parameters() if id(p) not in bert_ids and p.requires_grad]
        groups = [{"params": rest, "lr": self.lr}]
        if bert is not None and self.hparams.bert_finetune:
            groups.append({"params": list(bert.parameters()), "lr": self.hparams.bert_lr})
        opt = torch.optim.Adam(groups, lr=self.lr)
        if not self.lr_decay_epochs:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.lr_decay_epochs, gamma=self.lr_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
