"""CASC: Cross-modal Attention with Semantic Consistency (Xu et al., TNNLS 2020), every row of its tables.

Local alignment (Sec. III-B, Eqs. 3-9) as in CASC-base; global semantic consistency (Sec. III-C, Eqs. 10-12):
a label head d -> 512 -> K (tanh) predicts the image's semantic labels from both global attention vectors
A^I and A^T of the matched pair, trained by the positively weighted BCE of Eq. (11); test-time similarity
Eq. (13) S = beta * S_loc + (1 - beta) * S_G.

Where the paper and the authors' released code (which produced the paper's numbers) differ, the defaults
follow the released code and the printed reading is one switch away:

| what                    | default (released code)                         | printed reading (switch)                         |
|-------------------------|-------------------------------------------------|--------------------------------------------------|
| lambda_1 / lambda_2     | 4 (I2T) / 9 (T2I), I2T pooled by LogSumExp      | lambda_i2t=9, lambda_t2i=4, aggregation_i2t=mean |
| Eq. 11 reduction        | mean over batch x labels, per prediction, x10   | label_reduction=sum (~B*K times larger)          |
| Eq. 13 local term       | 1/2 (S_I2T + S_T2I)                             | local_fusion=sum                                 |
| S_G                     | sg_reading=pair: cos(s(head(A^I)), s(head(A^T)))| sg_reading=caption_labels: cos(s(head(mean v)), Y_T) |
| label-head lr           | 0.01 x 0.8^floor(epoch/3)                       | label_lr_decay=0.1, label_lr_decay_epochs=10     |
| LSE temperature (I2T)   | 5 (train.py:79)                                 | (not printed; SCAN: 5 F30K / 20 COCO for i-t)    |
| gradient clipping       | encoders and head each to norm 2 (model.py:493) | gradient_clipping=joint (one norm, Lightning's)  |
| best checkpoint         | val_local/rsum, S_loc alone (train.py:216)      | recipe monitor val/rsum (fused, beta)            |
| label assignment (data) | any dictionary token (data.py:72-76)            | data.label_assignment=pos                        |
| dict./vocab counts      | train + dev captions (vocab.py:65-85)           | data.label_counts_from / data.vocab_from = train |

Ablation switches (Tables I/II): local in {attention, max, none}, global_branch in {label, cosine, none}.
"""
from __future__ import annotations

import torch

from ..blocks import BiGRUTextEncoder, RegionEncoder, cross_attention_similarity, region_word_scores, triplet_ranking_loss
from ..blocks.fast_attention import length_groups
from ..blocks.functional import masked_mean, use_reference, wide
from ..blocks.semantic import (LabelHead, fuse, global_label_similarity_labels, global_label_similarity_pairs,
                               local_similarity, max_local_similarity, mean_pooled_cosine, pair_label_cosine,
                               label_constraint_loss, paired_global_vectors, prediction_cosine)
from ..engine.evaluation import Emb, gather_padded
from ..engine.metrics import RetrievalMetrics
from .casc_base import CASCBase
from .label_constraint import check_label_dictionary

LOCALS = ("attention", "max", "none")
GLOBALS = ("label", "cosine", "none")
SG_READINGS = ("pair", "caption_labels")
EVAL_ARGS = ("beta", "beta_sweep", "sg_reading")  # choose at test time: --model.beta 0.5 on a trained checkpoint


def _per_item(x: torch.Tensor) -> torch.Tensor:
    """[C, K] -> [C, 1, 1, K]: a per-caption vector that evaluation's padding trim never mistakes for words."""
    return x[:, None, None, :]


class CASC(CASCBase):
    """CASC and its ablations. See the module docstring for released-vs-printed switches.

    Args:
        vocab_size / num_labels: sizes; None = taken from the datamodule at setup (num_labels = data.num_labels
            words actually found; the data must serve labels: data.with_labels: true).
        local: 'attention' (cross attention, CASC-base), 'max' (no attention: mean over regions of the best word's
            cosine, DVSA-style; Table I row 1), 'none'.
        global_branch: 'label' (label head, S_G; CASC), 'cosine' (cosine of mean-pooled regions and words with its
            own triplet loss; Table I row 3), 'none'.
        direction: 'both', 'i2t' or 't2i': which local attention directions score (label branch unchanged).
        lambda_i2t / lambda_t2i / aggregation_i2t / aggregation_t2i / lse_temperature / score_norm: the attention.
        label_hidden: hidden size of the head (512); alpha: weight of the label loss (10).
        label_reduction: 'mean' (released) or 'sum' (Eq. 11 literally); positive_weights: p_c of Eq. (11) on/off.
        label_vectors: 'attention' (A^I, A^T of Eq. 10) or 'mean' (mean-pooled regions/words instead).
        sg_reading: 'pair' (released (a)) or 'caption_labels' (printed (b)).
        beta: Eq. (13) weight of the local term (an evaluation argument: --model.beta at test time).
        local_fusion: 'average' (released) or 'sum' (printed Eq. 13).
        beta_sweep: also report the metrics at each of these betas from the same evaluation pass, logged as
            <stage>_beta<b>/<metric> (e.g. test_beta0.5/rsum); None = off.
        label_lr / label_lr_decay / label_lr_decay_epochs: the label head's parameter group schedule.
        gradient_clipping: 'per_group' (released: the encoders and the label head each clipped to the trainer's
            gradient_clip_val, Code_CASC model.py:493-495) or 'joint' (one norm over all parameters, Lightning's).
    """

    def __init__(self, vocab_size: int | None = None, num_labels: int | None = None, feature_dim: int = 2048,
                 embed_dim: int = 1024, word_dim: int = 300, local: str = "attention", global_branch: str = "label",
                 direction: str = "both", lambda_i2t: float = 4.0, lambda_t2i: float = 9.0,
                 aggregation_i2t: str = "lse", aggregation_t2i: str = "mean", lse_temperature: float = 5.0,
                 score_norm: str = "clipped_l2", label_hidden: int = 512, alpha: float = 10.0,
                 label_reduction: str = "mean", positive_weights: bool = True, label_vectors: str = "attention",
                 sg_reading: str = "pair", beta: float = 0.8, local_fusion: str = "average",
                 beta_sweep: list[float] | None = None, label_lr: float = 0.01, label_lr_decay: float = 0.8,
                 label_lr_decay_epochs: int = 3, gradient_clipping: str = "per_group", **loop_kwargs):
        super(CASCBase, self).__init__(**loop_kwargs)  # RetrievalModule: CASCBase.__init__ would build its own hparams
        checks = {"local": (local, LOCALS), "global_branch": (global_branch, GLOBALS),
                  "direction": (direction, ("both", "i2t", "t2i")), "sg_reading": (sg_reading, SG_READINGS),
                  "label_vectors": (label_vectors, ("attention", "mean")), "local_fusion": (local_fusion, ("average", "sum")),
                  "label_reduction": (label_reduction, ("mean", "sum")),
                  "gradient_clipping": (gradient_clipping, ("per_group", "joint"))}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"CASC {name} must be one of {allowed}, got {value!r}")
        if local == "none" and global_branch == "none":
            raise ValueError("CASC needs a local or a global branch (local and global_branch are both 'none')")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        bad = [b for b in (beta_sweep or []) if not 0.0 <= b <= 1.0]
        if bad:
            raise ValueError(f"beta_sweep values must lie in [0, 1], got {bad}")
        # evaluation-only settings stay out of the checkpoint's hyper-parameters: `lightning test --ckpt_path`
        # re-applies those over the command line, which would freeze beta at its training value
        self.save_hyperparameters(ignore=list(EVAL_ARGS))
        self.beta, self.beta_sweep, self.sg_reading = beta, beta_sweep, sg_reading
        self.image_encoder = RegionEncoder(feature_dim, embed_dim)
        self.text_encoder: BiGRUTextEncoder | None = None
        self.label_head: LabelHead | None = None
        self.label_words: list[str] | None = None  # the data's label dictionary, in head-output order
        self.label_assignment: str | None = None  # how the data assigned labels (data.label_assignment)
        self.label_source: str | None = None
        if vocab_size is not None:
            self._build_text(vocab_size)
        if num_labels is not None and global_branch == "label":
            self._build_labels(num_labels)
        self._recording: list | None = None

    # ---- construction -------------------------------------------------------------------------------------
    @property
    def uses_labels(self) -> bool:
        return self.hparams.global_branch == "label"

    @property
    def required_inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("labels",) if self.uses_labels else ()

    def _build_labels(self, num_labels: int) -> None:
        if num_labels < 1:
            raise ValueError("the label branch needs at least one label: use global_branch: none for '0 labels'")
        self.label_head = LabelHead(self.hparams.embed_dim, num_labels, self.hparams.label_hidden)
        self.register_buffer("pos_weight", torch.ones(num_labels))
        self.hparams["num_labels"] = num_labels

    def configure_from_data(self, datamodule) -> None:
        super().configure_from_data(datamodule)
        if not self.uses_labels:
            return
        k = len(datamodule.labels)
        words = list(datamodule.labels.words)
        assignment = getattr(datamodule.labels, "assignment", None)
        source = str(getattr(datamodule, "label_path", "the data's label dictionary"))
        if self.label_words is not None:  # loaded from a checkpoint first (load_model, ensembles, pictures)
            self.check_label_dictionary(words, assignment, source, self.label_words, self.label_assignment)
        self.label_words, self.label_assignment, self.label_source = words, assignment, source
        if self.label_head is None:
            self._build_labels(k)
        elif self.label_head.fc2.out_features != k:
            raise ValueError(f"model has {self.label_head.fc2.out_features} labels but the data's label dictionary has "
                             f"{k}: use the same data.num_labels / data.label_pos as in training")
        if self.hparams.positive_weights:
            self.pos_weight.copy_(datamodule.label_pos_weights.to(self.pos_weight))

    check_label_dictionary = staticmethod(check_label_dictionary)

    # the label dictionary travels with the weights: predicted labels (Fig. 4) are named without the data
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["zoo_data"]["label_words"] = self.label_words
        checkpoint["zoo_data"]["label_assignment"] = self.label_assignment

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("zoo_data", {})
        words = saved.get("label_words")
        if words is None:
            return
        if self.label_words is not None:  # set at setup from the data (lightning test / fit resume): compare
            self.check_label_dictionary(self.label_words, self.label_assignment, self.label_source, words,
                                        saved.get("label_assignment"))
        # checkpoints written before label_assignment existed assigned by part of speech ('pos')
        self.label_words, self.label_assignment = words, saved.get("label_assignment", "pos")

    # ---- encoders -----------------------------------------------------------------------------------------------
    @property
    def _pair_labels(self) -> bool:
        return self.uses_labels and self.hparams.label_vectors == "attention" and self.sg_reading == "pair"

    def encode_images(self, batch: dict) -> Emb:
        # never reads batch["labels"]: on evaluation splits that is the union over the image's test captions
        v = self.image_encoder(batch["images"])
        out = {"regions": v, "image_ids": batch["image_ids"]}
        if self._pair_labels:
            out["regions_proj"] = self.label_head.project(v)
        elif self.uses_labels:  # a pair-independent prediction from the mean of the regions
            out["label_logits"] = self.label_head(v.mean(dim=1))
        return out

    def encode_captions(self, batch: dict) -> Emb:
        out = super().encode_captions(batch)
        out["caption_ids"] = batch["caption_ids"]
        if self._pair_labels:
            out["words_proj"] = self.label_head.project(out["words"])
        elif self.uses_labels:
            if self.sg_reading == "caption_labels":
                out["label_vec"] = _per_item(batch["caption_labels"].to(out["words"].dtype))
            else:
                mask = torch.arange(out["words"].shape[1], device=out["words"].device)[None] < out["lengths"][:, None]
                out["label_logits"] = _per_item(self.label_head(masked_mean(out["words"], mask[..., None], dim=1)))
        return out

    # ---- scores ---------------------------------------------------------------------------------------------------
    def score_parts(self, img: Emb, cap: Emb, with_global: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(S_loc, S_G) of every pair of a block, [I, C] each (None where the branch is off or not asked for)."""
        hp = self.hparams
        # the [I, C, R, L] cosine grid is formed only where the max local branch reads it (S_G reading (a) forms
        # its own per caption length); the attention branch goes through the shared scorer (fast path,
        # `reference_scoring()` for the slow one)
        sc = region_word_scores(img["regions"], cap["words"], cap["lengths"]) if hp.local == "max" else None
        # S_G reading (a) needs the same attention weights as the local term (same lambdas and normalisation):
        # in evaluation the fast scorer hands them over (Eq. (10) weights), no second contraction or softmax
        fused_sg = (with_global and self._pair_labels and hp.local == "attention" and hp.direction == "both"
                    and hp.score_norm != "softmax" and not use_reference() and not torch.is_grad_enabled())
        s_loc = None
        if hp.local == "attention":
            s = cross_attention_similarity(img["regions"], cap["words"], cap["lengths"], i2t=hp.direction != "t2i",
                                           t2i=hp.direction != "i2t", lambda_i2t=hp.lambda_i2t,
                                           lambda_t2i=hp.lambda_t2i, norm=hp.score_norm,
                                           agg_i2t=hp.aggregation_i2t, agg_t2i=hp.aggregation_t2i,
                                           lse_temperature=hp.lse_temperature, global_weights=fused_sg)
            s_loc = local_similarity(s.get("i2t"), s.get("t2i"), average=hp.local_fusion == "average")
        elif hp.local == "max":
            s_loc = max_local_similarity(sc)
        s_g = None
        if not with_global:
            pass
        elif hp.global_branch == "cosine":
            s_g = mean_pooled_cosine(img["regions"], cap["words"], cap["lengths"])
        elif fused_sg:
            s_g = pair_label_cosine(self.label_head, s["w_regions"], img["regions_proj"], s["w_words"],
                                    cap["words_proj"])
        elif self._pair_labels:
            s_g = self._pair_label_similarity(img, cap)
        elif self.uses_labels and self.sg_reading == "caption_labels":
            s_g = global_label_similarity_labels(img["label_logits"], cap["label_vec"][:, 0, 0])
        elif self.uses_labels:  # label_vectors 'mean', released cosine between the two predictions
            s_g = prediction_cosine(img["label_logits"][:, None, :], cap["label_logits"][None, :, 0, 0])
        if self._recording is not None:
            self._recording.append((img["image_ids"], cap["caption_ids"], s_loc, s_g))
        return s_loc, s_g

    def _pair_label_similarity(self, img: Emb, cap: Emb) -> torch.Tensor:
        """S_G reading (a) of a block, [I, C], where the local scorer does not hand over the weights (other local
        branches, one direction, training-time calls): captions of one length at a time, trimmed to it, so the
        [I, n, R, l] attention weights carry no padding (same values as one call over the padded block, which is
        what runs under `reference_scoring()`)."""
        hp = self.hparams
        kw = dict(smooth_i2t=hp.lambda_i2t, smooth_t2i=hp.lambda_t2i, norm=hp.score_norm)
        regions, words, lengths = img["regions"], cap["words"], cap["lengths"]
        if use_reference():
            sc = region_word_scores(regions, words, lengths)
            return global_label_similarity_pairs(self.label_head, sc, img["regions_proj"], cap["words_proj"], **kw)
        out = torch.empty(regions.shape[0], lengths.shape[0], dtype=torch.promote_types(regions.dtype, torch.float32),
                          device=regions.device)
        order, groups = length_groups(lengths)
        for start, count, n in groups:
            idx = order[start : start + count]
            sc = region_word_scores(regions, words[idx, :n], lengths[idx])
            out[:, idx] = global_label_similarity_pairs(self.label_head, sc, img["regions_proj"],
                                                        cap["words_proj"][idx, :n], **kw).to(out.dtype)
        return out

    def score(self, img: Emb, cap: Emb) -> torch.Tensor:
        s_loc, s_g = self.score_parts(img, cap)
        return fuse(s_loc, s_g, self.beta)

    # ---- training --------------------------------------------------------------------------------------------------
    def matched_attended_vectors(self, img: Emb, cap: Emb) -> tuple[torch.Tensor, torch.Tensor]:
        """The label head's inputs for the matched pairs (row n with row n): A^I, A^T of Eq. (10) ([B, d] each),
        or the mean-pooled regions / real words (label_vectors: mean)."""
        hp = self.hparams
        v, t, lengths = img["regions"], cap["words"], cap["lengths"]
        if hp.label_vectors == "mean":
            mask = torch.arange(t.shape[1], device=t.device)[None] < lengths[:, None]
            return v.mean(1), masked_mean(t, mask[..., None], dim=1)
        return paired_global_vectors(v, t, lengths, smooth_i2t=hp.lambda_i2t, smooth_t2i=hp.lambda_t2i,
                                     norm=hp.score_norm)  # Eq. (10)

    def pair_label_logits(self, img: Emb, cap: Emb) -> tuple[torch.Tensor, torch.Tensor]:
        """Label logits of the matched pairs (row n with row n) from A^I and A^T: ([B, K], [B, K])."""
        a_img, a_txt = self.matched_attended_vectors(img, cap)
        return self.label_head(a_img), self.label_head(a_txt)

    def training_losses(self, batch: dict, img: Emb, cap: Emb) -> dict[str, torch.Tensor]:
        hp = self.hparams
        hard, ids = self.use_hardest_negative, batch["image_ids"]
        # S_G of the label branch is a test-time score: training needs only the matched pairs' predictions
        s_loc, s_g = self.score_parts(img, cap, with_global=hp.global_branch == "cosine")
        losses = {}
        if s_loc is not None:
            losses["triplet"] = triplet_ranking_loss(s_loc, self.margin, hard, ids)  # Eq. (9), summed over the batch
        if hp.global_branch == "cosine":
            losses["triplet_global"] = triplet_ranking_loss(s_g, self.margin, hard, ids)
        if self.uses_labels:
            a_img, a_txt = self.matched_attended_vectors(img, cap)
            pw = self.pos_weight if hp.positive_weights else None
            y = batch["labels"]  # the image's training label set (union over its training captions)
            # Eq. (11)-(12) as released: mean over batch x labels for each prediction, times alpha (= 10); the
            # literal sum (label_reduction: sum) is ~B*K times larger against the batch-summed triplet loss.
            losses["label"] = label_constraint_loss(self.label_head, a_img, a_txt, y, pw, hp.label_reduction, hp.alpha)
        return losses

    def configure_optimizers(self):
        """Encoders at lr (step decay as in the shared loop); the label head as a second group at label_lr x
        label_lr_decay^floor(epoch / label_lr_decay_epochs). The label loss also updates the encoders."""
        hp = self.hparams
        head = list(self.label_head.parameters()) if self.label_head is not None else []
        head_ids = {id(p) for p in head}
        groups = [{"params": [p for p in self.parameters() if id(p) not in head_ids], "lr": self.lr}]
        if head:
            groups.append({"params": head, "lr": hp.label_lr})
        opt = torch.optim.Adam(groups)
        step = lambda every, gamma: (lambda e: gamma ** (e // every) if every else 1.0)  # noqa: E731
        lambdas = [step(self.lr_decay_epochs, self.lr_decay)]
        if head:
            lambdas.append(step(hp.label_lr_decay_epochs, hp.label_lr_decay))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Released (Code_CASC model.py:493-495): clip_grad_norm_ of the encoders and of the label head separately,
        each to gradient_clip_val, so a large label-head gradient does not shrink the encoders' step. The two
        groups are the optimiser's parameter groups (configure_optimizers). `gradient_clipping: joint` = one norm."""
        if self.hparams.gradient_clipping == "joint" or self.label_head is None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"CASC gradient_clipping: per_group clips norms; trainer.gradient_clip_algorithm is "
                             f"{gradient_clip_algorithm!r}: use 'norm', or model.gradient_clipping: joint")
        for group in optimizer.param_groups:  # gradients are unscaled here under 16-mixed (Lightning unscales first)
            torch.nn.utils.clip_grad_norm_(group["params"], float(gradient_clip_val))

    # ---- evaluation: the beta sweep and the local-only metrics from one pass --------------------------------------
    @property
    def _has_both_parts(self) -> bool:
        return self.hparams.local != "none" and self.hparams.global_branch != "none"

    def _wants_local_metrics(self) -> bool:
        """Validation also reports S_loc alone (`val_local/rsum`), the released code's checkpoint selection
        (Code_CASC train.py:216 validates without the label model); tests report it only with a beta sweep."""
        return self._trainer is not None and not self.trainer.testing

    @torch.no_grad()
    def evaluate_embeddings(self, img: Emb, cap: Emb, image_ids: torch.Tensor, caption_ids: torch.Tensor,
                            n_images: int, progress: bool = False) -> dict[str, dict[str, float]]:
        """The shared evaluation; with beta_sweep, also the metrics at every beta, and in validation the metrics
        of S_loc alone as `local` (logged val_local/rsum), from the S_loc and S_G blocks recorded while the shared
        loop scored the grid (no second scoring pass). A row with one score part only (no S_G, or S_G alone)
        reports its score as `local` too, so every row has the key the recipes monitor."""
        betas = [(f"beta{float(b):g}", float(b)) for b in (self.beta_sweep or [])]
        local = self._wants_local_metrics()
        if local and self._has_both_parts:
            betas.append(("local", 1.0))  # fuse(S_loc, S_G, 1) = S_loc
        if not betas:
            results = super().evaluate_embeddings(img, cap, image_ids, caption_ids, n_images, progress)
            return self._alias_local(results) if local else results
        seen = torch.unique(gather_padded(image_ids))
        self._recording = []
        try:
            results = super().evaluate_embeddings(img, cap, image_ids, caption_ids, n_images, progress)
            blocks = self._recording
        finally:
            self._recording = None
        k = self.caps_per_image
        if seen.numel() < n_images:  # the shared loop's remapping of a partial evaluation (positions keep id order)
            remap = torch.full((n_images,), -1, dtype=torch.long, device=seen.device)
            remap[seen] = torch.arange(seen.numel(), device=seen.device)
            img_pos, cap_pos = (lambda i: remap[i]), (lambda c: remap[c // k] * k + c % k)
            n_images = seen.numel()
        else:
            img_pos = cap_pos = (lambda i: i)
        device = image_ids.device
        rows_ids = torch.unique(torch.cat([b[0] for b in blocks])) if blocks else \
            torch.empty(0, dtype=torch.long, device=device)  # a rank without image rows (more ranks than images)
        row_of = torch.full((int(rows_ids.max()) + 1 if blocks else 0,), -1, dtype=torch.long, device=device)
        row_of[rows_ids] = torch.arange(rows_ids.numel(), device=device)
        grids = [None, None]
        for i_ids, c_ids, *parts in blocks:
            for g, part in enumerate(parts):
                if part is None:
                    continue
                if grids[g] is None:
                    grids[g] = torch.empty(rows_ids.numel(), n_images * k, dtype=torch.float32, device=part.device)
                grids[g][row_of[i_ids][:, None], cap_pos(c_ids)[None, :]] = part.float()
        if blocks and (grids[0] is None or grids[1] is None):
            from lightning.pytorch.utilities import rank_zero_warn
            missing = "S_G (global_branch: none)" if grids[1] is None else "S_loc (local: none)"
            rank_zero_warn(f"beta_sweep on a CASC without {missing}: Eq. (13) has one term, so every beta gives "
                           "the same figures")
        for name, beta in betas:
            sims = fuse(grids[0], grids[1], beta) if blocks else torch.empty(0, n_images * k, device=device)
            metric = RetrievalMetrics(k, self.fold_size).to(sims.device)
            metric.update(sims, img_pos(rows_ids))  # every rank updates (possibly empty): compute() gathers
            for split, m in metric.compute().items():
                results[name + ("" if split == "all" else f"_{split}")] = m
        return self._alias_local(results) if local and not self._has_both_parts else results

    @staticmethod
    def _alias_local(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        base = [s for s in results if s == "all" or not (s.startswith("beta") or s.startswith("local"))]
        for split in base:
            results["local" if split == "all" else f"local_{split}"] = dict(results[split])
        return results

    # ---- predicted labels (Fig. 4) ----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_image_labels(self, img: Emb, cap: Emb, top_captions: int = 3, k: int = 10,
                             sims: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k labels of each image with their scores, [I, k] each (label ids index datamodule.labels.words).

        As in the released code: the sigmoid predictions from A^I of the image paired with each of its
        `top_captions` best-scoring captions (of `cap`), averaged. `sims` [I, C]: precomputed scores (else score()).
        """
        if self.label_head is None:
            raise RuntimeError("predict_image_labels needs the label branch (global_branch: label)")
        hp = self.hparams
        sims = self.score(img, cap) if sims is None else sims
        top = sims.topk(min(top_captions, sims.shape[1]), dim=1).indices  # [I, n]
        probs = []
        for n in range(top.shape[1]):
            c = top[:, n]
            pair_img = {"regions": img["regions"]}
            pair_cap = {"words": cap["words"][c], "lengths": cap["lengths"][c]}
            logits_img, _ = self.pair_label_logits(pair_img, pair_cap) if hp.label_vectors == "attention" else (
                self.label_head(img["regions"].mean(1)), None)
            probs.append(torch.sigmoid(wide(logits_img)))
        p = torch.stack(probs).mean(0)
        scores, ids = p.topk(min(k, p.shape[1]), dim=1)
        return scores, ids

    @torch.no_grad()
    def image_label_words(self, datamodule, images: list[int], top_captions: int = 3,
                          k: int = 10) -> list[list[tuple[str, float]]]:
        """Fig. 4: the top-k (word, score) labels of test-split images `images`, retrieved against every test caption.

            model = CASC.load_from_checkpoint("runs/casc_synth/checkpoints/best.ckpt")
            dm = SynthScenesDataModule(..., with_labels=True); dm.prepare_data(); dm.setup("test")
            model.image_label_words(dm, [0, 1, 2])
        """
        from ..engine.evaluation import cat_embeddings, score_blockwise

        self.eval()
        chunks = [(self.encode_images(b), self.encode_captions(b))
                  for b in (self.transfer_batch_to_device(b, self.device, 0) for b in datamodule.test_dataloader())]
        img, cap = cat_embeddings([c[0] for c in chunks]), cat_embeddings([c[1] for c in chunks])
        img = {key: v[images] for key, v in img.items()}  # loader order = image order (no shuffling)

        sims = score_blockwise(self.score, img, cap, self.eval_image_block, self.eval_caption_block)
        scores, ids = self.predict_image_labels(img, cap, top_captions, k, sims=sims)
        words = self.label_words if self.label_words is not None else datamodule.labels.words
        return [[(words[j], float(s)) for j, s in zip(row_i, row_s)] for row_i, row_s in zip(ids.tolist(), scores)]


__all__ = ["CASC"]
