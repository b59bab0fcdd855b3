"""The one retrieval LightningModule every method derives from: training step, evaluation, metrics.

A method implements three things:
- encode_images(batch) -> dict of tensors, one row per image in the batch;
- encode_captions(batch) -> dict of tensors, one row per caption (with "lengths" for word sequences);
- score(img, cap) -> [I, C] similarities of every image in `img` with every caption in `cap`;
and may override global_embedding(emb, side) (one vector per item for zoo.search's first stage).
Pair-dependent scorers (cross attention, CCCL's GRU branch) work the same way: evaluation encodes every
image and caption once, then calls `score` block by block over the whole [I, C] grid.
Methods with extra losses override `training_losses`.
"""
from __future__ import annotations

import contextlib

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.errors import DataError

from ..blocks import l2_normalize, mean_region_vector, mean_word_vector, triplet_ranking_loss
from .evaluation import Emb, cat_embeddings, gather_and_order, gather_padded, score_blockwise
from .metrics import RetrievalMetrics
from .progress import lightning_progress
from .reporting import format_recall_table

# batch extras a method can ask for -> the datamodule option that serves them
DATA_OPTIONS = {"boxes": "with_boxes", "pos": "with_pos", "graphs": "with_graphs", "labels": "with_labels",
                "subwords": "subword_tokenizer"}


class RetrievalModule(L.LightningModule):
    """Shared training/evaluation loop.

    Args:
        margin: triplet margin (sigma in CASC Eq. (8)).
        hardest_negative: hardest in-batch negatives (True) or the sum over all negatives.
        sum_negatives_epochs: use the sum over all negatives for this many first epochs, hardest after
            (VSE++'s remedy for the collapse hardest negatives can cause from a random start; 0 = papers).
        lr: Adam learning rate; lr_decay_epochs: multiply it by lr_decay every that many epochs (0 = never).
        eval_image_block / eval_caption_block: block sizes of the [I, C] scoring grid.
        fold_size: also report the mean over folds of this many images (COCO 1K) when the set is larger.
        eval_fp32: encode and score validation/test in float32 even under a mixed-precision trainer (scores always
            leave a method in float32; with bf16 encoders a weak model's near ties can still move the rsum by ~1:
            README, Speed, "bf16 evaluation"). An evaluation argument: it applies with --ckpt_path.

    Captions per image come from the data (data.caps_per_image) alone. The vocabulary the model was trained
    with (its words, in id order) is stored in every checkpoint; evaluating or resuming it with data that
    serves another vocabulary is refused instead of silently scoring shuffled word ids.
    """

    #: False for methods whose text side ignores the zoo's word ids (e.g. a BERT encoder on sub-words)
    uses_vocabulary: bool = True

    def __init__(self, margin: float = 0.2, hardest_negative: bool = True, sum_negatives_epochs: int = 0, lr: float = 2e-4,
                 lr_decay_epochs: int = 15, lr_decay: float = 0.1, eval_image_block: int = 128,
                 eval_caption_block: int = 1024, fold_size: int | None = 1000, eval_fp32: bool = False):
        super().__init__()
        self.margin = margin
        self.hardest_negative = hardest_negative
        self.sum_negatives_epochs = sum_negatives_epochs
        self.lr = lr
        self.lr_decay_epochs = lr_decay_epochs
        self.lr_decay = lr_decay
        self.eval_image_block = eval_image_block
        self.eval_caption_block = eval_caption_block
        self.fold_size = fold_size
        self.eval_fp32 = eval_fp32
        self.caps_per_image = 5  # replaced by the data's value at setup, and stored in checkpoints
        self.vocab_words: list[str] | None = None  # the training vocabulary, id order (set at setup / from a checkpoint)
        self.vocab_source: str | None = None
        self._data_attached = False
        self._eval_chunks: dict[str, list] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}

    #: batch extras this method reads (keys of DATA_OPTIONS); setup fails early if the data does not serve them
    required_inputs: tuple[str, ...] = ()

    # ---- what a method provides -------------------------------------------------------------------
    def encode_images(self, batch: dict) -> Emb:
        raise NotImplementedError

    def encode_captions(self, batch: dict) -> Emb:
        raise NotImplementedError

    def score(self, img: Emb, cap: Emb) -> torch.Tensor:
        raise NotImplementedError

    def global_embedding(self, emb: Emb, side: str) -> torch.Tensor:
        """One unit vector per item, [N, d] float32, for a search's first stage (zoo.search: an inner-product index
        picks the candidates that `score` re-ranks). side "images": the l2-normalised mean of the regions;
        "captions": that of the real words (CASC Table I row 3's vectors, semantic.mean_region_vector /
        mean_word_vector). A method whose score is global (VSE++, VSE-infinity: one "vector" per item, score = the
        dot product) gives that vector l2-normalised, so with image_norm/text_norm on (their default) stage 1 ranks
        exactly as the method does; any method may override."""
        if side not in ("images", "captions"):
            raise ValueError(f"side must be 'images' or 'captions', got {side!r}")
        if "vector" in emb:
            return l2_normalize(emb["vector"].float())
        if side == "images":
            return mean_region_vector(emb["regions"])
        return mean_word_vector(emb["words"], emb["lengths"] if "lengths" in emb else emb["n_words"])

    def configure_from_data(self, datamodule) -> None:
        """Called once before training/evaluation with the datamodule (e.g. to size a vocabulary)."""

    #: the fix named when data brings another word vocabulary than the model's embedding was built for
    VOCAB_HINT = ("use the vocabulary the model was trained with (data.vocab_path; `python -m zoo.tools.vocab CKPT "
                  "OUT.json` writes it from the checkpoint)")
    OFFICIAL_VOCAB_HINT = ("use the vocabulary the model was trained with (data.vocab_path; an imported official "
                           "model needs the official vocabulary)")

    @staticmethod
    def size_word_embedding(datamodule, encoder: torch.nn.Module | None, build, hint: str = VOCAB_HINT) -> None:
        """A word-level text encoder (one with an `embed` table) meets the data's vocabulary: `build(size)` while the
        encoder is None, else data with another vocabulary size is refused (DataError naming the vocabulary file)."""
        size = datamodule.vocab_size
        if encoder is None:
            build(size)
        elif encoder.embed.num_embeddings != size:
            have = encoder.embed.num_embeddings
            raise DataError(datamodule.vocab_path, f"the model's vocabulary has {have} words but this one has {size}",
                            hint)

    def training_losses(self, batch: dict, img: Emb, cap: Emb) -> dict[str, torch.Tensor]:
        """Default objective: the hardest-negative triplet loss on the batch's pairs."""
        sims = self.score(img, cap)
        return {"triplet": triplet_ranking_loss(sims, self.margin, self.use_hardest_negative, batch["image_ids"])}

    @property
    def use_hardest_negative(self) -> bool:
        epoch = self.current_epoch if self._trainer is not None else 0
        return self.hardest_negative and epoch >= self.sum_negatives_epochs

    # ---- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            self.check_data(dm)
            self.caps_per_image = int(getattr(dm, "caps_per_image", self.caps_per_image))
            self._data_attached = True
            if self.uses_vocabulary and getattr(dm, "vocab", None) is not None:
                self.vocab_words, self.vocab_source = list(dm.vocab.idx2word), str(dm.vocab_path)
            self.configure_from_data(dm)

    def check_data(self, datamodule) -> None:
        missing = [DATA_OPTIONS[k] for k in self.required_inputs if not getattr(datamodule, DATA_OPTIONS[k], None)]
        if missing:
            raise DataError(None, f"{type(self).__name__} needs data the datamodule is not set to serve",
                            "set " + ", ".join(f"data.{m}" for m in missing) + " in the recipe")
        feat = getattr(datamodule, "feature_dim", None)
        want = self.hparams.get("feature_dim")
        if feat is not None and want is not None and feat != want:
            raise DataError(None, f"the data serves {feat}-d region features but model.feature_dim is {want}",
                            "set data.feature_dim and model.feature_dim to the width stored in {split}_ims.npy")

    def check_vocabulary(self, data_words: list[str] | None, data_source: str | None, trained_words: list[str] | None,
                         trained_source: str | None) -> None:
        """Refuses data whose word ids would mean other words than in training (other size or order)."""
        if not self.uses_vocabulary or data_words is None or trained_words is None or data_words == trained_words:
            return
        same = ", same size but another word order" if len(data_words) == len(trained_words) else ""
        raise DataError(data_source, "this vocabulary is not the one the checkpoint was trained with "
                        f"({len(trained_words)} words from {trained_source}; the data serves {len(data_words)}{same}), "
                        "so every word id would mean another word",
                        f"evaluate with the training vocabulary: set data.vocab_path to {trained_source} (or a copy "
                        "of it; `python -m zoo.tools.vocab CKPT OUT.json` writes the checkpoint's own)")

    # ---- what a checkpoint carries besides the weights ---------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["zoo_data"] = {"caps_per_image": self.caps_per_image, "vocab": self.vocab_words,
                                  "vocab_source": self.vocab_source}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("zoo_data")
        if saved is None:
            return
        if self.vocab_words is not None:  # set at setup when a datamodule is attached (trainer.test/fit resume)
            self.check_vocabulary(self.vocab_words, self.vocab_source, saved.get("vocab"), saved.get("vocab_source"))
        if saved.get("vocab") is not None:
            self.vocab_words, self.vocab_source = saved["vocab"], saved.get("vocab_source")
        if not self._data_attached:  # with a datamodule, its caps_per_image is the one source of truth
            self.caps_per_image = saved.get("caps_per_image", self.caps_per_image)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        img = self.encode_images(batch)
        cap = self.encode_captions(batch)
        losses = self.training_losses(batch, img, cap)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }")
        bs = batch["tokens"].shape[0]
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.lr_decay_epochs:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.lr_decay_epochs, gamma=self.lr_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # evaluation: encode every image and caption once, then score the whole grid block by block
    def _eval_start(self, stage: str) -> None:
        self._eval_chunks[stage] = []

    def _eval_step(self, stage: str, batch: dict) -> None:
        with torch.autocast(self.device.type, enabled=False) if self.eval_fp32 else contextlib.nullcontext():
            img = {k: v.detach() for k, v in self.encode_images(batch).items()}
            cap = {k: v.detach() for k, v in self.encode_captions(batch).items()}
        self._eval_chunks[stage].append((img, cap, batch["image_ids"], batch["caption_ids"]))

    @torch.no_grad()
    def evaluate_embeddings(self, img: Emb, cap: Emb, image_ids: torch.Tensor, caption_ids: torch.Tensor,
                            n_images: int, progress: bool = False) -> dict[str, dict[str, float]]:
        """Metrics from per-rank embeddings; identical on every rank. Usable without a Trainer.

        When fewer than n_images were encoded (limit_val_batches, a sanity check), the images seen and their
        captions are scored as a smaller retrieval set, with a warning.
        """
        k = self.caps_per_image
        seen = torch.unique(gather_padded(image_ids))
        # twin scenes (SynthScenes twins: images 2k, 2k + 1 mirror twins): also the twin accuracy, if every pair is
        # whole (then the remap below keeps pairs at 2m, 2m + 1: an even number of seen images precedes each pair)
        dm = self._trainer.datamodule if self._trainer is not None else None
        twins = bool(getattr(dm, "twins", False)) and bool((torch.isin(seen ^ 1, seen)).all())
        if seen.numel() < n_images:
            rank_zero_warn(f"evaluating on the {seen.numel()} of {n_images} images that were encoded "
                           "(limit_*_batches or a sanity check): not comparable with full-set numbers")
            remap = torch.full((n_images,), -1, dtype=torch.long, device=image_ids.device)
            remap[seen] = torch.arange(seen.numel(), device=image_ids.device)
            image_ids, caption_ids = remap[image_ids], remap[caption_ids // k] * k + caption_ids % k
            n_images = seen.numel()
        if n_images == 1:
            rank_zero_warn("evaluating on a split with a single image: every caption retrieves it and it retrieves "
                           "its own captions, so every recall is 100 (rsum 600) by construction; validation would "
                           "pick checkpoints on a metric that cannot move (use a split with more images)")
        n_caps = n_images * k
        img = gather_and_order(img, image_ids, n_images, "images")
        cap = gather_and_order(cap, caption_ids, n_caps, "captions")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        per_rank = -(-n_images // world)
        lo, hi = rank * per_rank, min(n_images, (rank + 1) * per_rank)  # each rank scores its own image rows
        metric = RetrievalMetrics(self.caps_per_image, self.fold_size, twins=twins).to(next(iter(img.values())).device)
        if hi > lo:
            rows = score_blockwise(self.score, {k: v[lo:hi] for k, v in img.items()}, cap, self.eval_image_block,
                                   self.eval_caption_block, progress=progress and rank == 0)
            metric.update(rows, torch.arange(lo, hi, device=rows.device))
        else:  # more ranks than images: contribute an empty shard so the all-gather still lines up
            metric.update(torch.empty(0, n_caps, device=metric.device), torch.empty(0, dtype=torch.long,
                                                                                   device=metric.device))
        return metric.compute()

    def _eval_end(self, stage: str) -> None:
        chunks = self._eval_chunks.pop(stage, [])
        if not chunks:
            return
        image_ids = torch.cat([c[2] for c in chunks])
        caption_ids = torch.cat([c[3] for c in chunks])
        # one copy of the embeddings at a time: each batch's tensors are released once concatenated
        img = cat_embeddings([c[0] for c in chunks])
        cap = cat_embeddings([c[1] for c in chunks])
        del chunks
        dm = self.trainer.datamodule
        n_images = dm.num_eval_images(stage)
        precision = (torch.autocast(self.device.type, enabled=False) if self.eval_fp32
                     else self.trainer.precision_plugin.forward_context())  # the run's precision, or fp32 throughout
        with precision, lightning_progress(self.trainer):
            results = self.evaluate_embeddings(img, cap, image_ids, caption_ids, n_images,
                                               progress=self.trainer.is_global_zero)
        self.last_metrics = results
        for split, metrics in results.items():
            prefix = stage if split == "all" else f"{stage}_{split}"
            for k, v in metrics.items():
                # identical on every rank already (computed from gathered data): no extra reduction needed
                self.log(f"{prefix}/{k}", v, prog_bar=(k == "rsum" and split == "all"), rank_zero_only=False,
                         sync_dist=False)
        if stage == "test" and self.trainer.is_global_zero:
            print(format_recall_table(results, title=f"{type(self).__name__} on {dm.describe(stage)}"))

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """`lightning predict`: the embeddings of the test split's images and captions, on the CPU, with ids."""
        img = {f"image_{k}": v.detach().cpu() for k, v in self.encode_images(batch).items()}
        cap = {f"caption_{k}": v.detach().cpu() for k, v in self.encode_captions(batch).items()}
        return {"image_ids": batch["image_ids"].cpu(), "caption_ids": batch["caption_ids"].cpu(), **img, **cap}
