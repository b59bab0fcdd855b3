"""CASC's label constraint (Xu et al., TNNLS 2020, Sec. III-C, Eqs. (10)-(12)) as a switch for any method.

Table VII of CASC adds its semantic label prediction to other fine-grained matchers (CASC-sm, CASC-DAN,
CASC-SCAN): a label head d -> 512 -> K (tanh between) predicts the image's labels from the pair's global attended
vectors A^I and A^T, trained by the positively weighted BCE of Eq. (11), added to the method's own loss with
weight alpha (Eq. (12)). A method opts in by deriving from `LabelConstraintMixin` (before RetrievalModule),
calling `init_label_constraint(...)` in its __init__ and implementing `matched_attended_vectors(img, cap)`:
(A^I [B, d], A^T [B, d]) of the matched pairs of a training batch. The head and the loss are
zoo.blocks.semantic.LabelHead and label_constraint_loss, the same code CASC's own label branch runs.

Off (the default), the method is unchanged: no parameter, no buffer, no loss term, the same optimiser.
The constraint is a training-time term only: the test score stays the method's own (CASC's test-time fusion,
Eq. (13), is CASC's; see README, interpretation table).
"""
from __future__ import annotations

import torch
from torch import nn

from datamodules.errors import DataError

from ..blocks.semantic import LabelHead, label_constraint_loss
from ..engine.evaluation import Emb

#: label_settings keys and their defaults: CASC's released settings (recipes/casc_synth.yaml)
LABEL_DEFAULTS = {"alpha": 10.0, "hidden": 512, "reduction": "mean", "positive_weights": True, "lr": 0.01,
                  "lr_decay": 0.8, "lr_decay_epochs": 3, "num_labels": None}


def check_label_dictionary(data_words: list[str], data_assignment: str | None, data_source: str | None,
                           trained_words: list[str] | None, trained_assignment: str | None) -> None:
    """Refuses data whose label ids would mean other words (or come from other tokens) than in training:
    the head's outputs are the trained dictionary's words, compared word by word as the vocabulary is."""
    if trained_words is not None and list(data_words) != list(trained_words):
        diff = next((i for i, (a, b) in enumerate(zip(data_words, trained_words)) if a != b),
                    min(len(data_words), len(trained_words)))
        where = (f"label {diff} is {data_words[diff]!r} in the data but {trained_words[diff]!r} in training"
                 if diff < min(len(data_words), len(trained_words)) else "one list is longer")
        raise DataError(data_source, "this label dictionary is not the one the checkpoint was trained with "
                        f"({len(trained_words)} labels in training, {len(data_words)} here; {where}), so the "
                        "head's outputs would name other words than the caption vectors and targets",
                        "use the training run's data.label_pos, data.num_labels, data.label_counts_from and "
                        "label_stopwords (and its data)")
    if trained_assignment is not None and data_assignment is not None and data_assignment != trained_assignment:
        raise DataError(data_source, "the checkpoint was trained with data.label_assignment "
                        f"{trained_assignment!r}, the data assigns labels by {data_assignment!r}",
                        f"set data.label_assignment: {trained_assignment}")


def label_settings(settings: dict | None) -> dict:
    """label_settings with CASC's defaults filled in; unknown keys and bad values are errors."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(LABEL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown label_settings {unknown}; known: {sorted(LABEL_DEFAULTS)}")
    out = {**LABEL_DEFAULTS, **settings}
    if out["reduction"] not in ("mean", "sum"):
        raise ValueError(f"label_settings.reduction must be 'mean' or 'sum', got {out['reduction']!r}")
    if out["num_labels"] is not None and int(out["num_labels"]) < 1:
        raise ValueError("the label constraint needs at least one label (label_settings.num_labels >= 1)")
    if float(out["alpha"]) < 0 or float(out["lr"]) <= 0 or int(out["hidden"]) < 1:
        raise ValueError(f"label_settings alpha must be >= 0, lr > 0 and hidden >= 1, got {settings}")
    return out


class LabelConstraint(nn.Module):
    """The label head and its loss: CASC Eqs. (11)-(12) on given attended vectors. p_c (pos_weight) from the data."""

    def __init__(self, embed_dim: int, num_labels: int, hidden: int = 512, alpha: float = 10.0,
                 reduction: str = "mean", positive_weights: bool = True):
        super().__init__()
        self.head = LabelHead(embed_dim, num_labels, hidden)
        self.register_buffer("pos_weight", torch.ones(num_labels))
        self.alpha, self.reduction, self.positive_weights = alpha, reduction, positive_weights

    @property
    def num_labels(self) -> int:
        return self.head.fc2.out_features

    def forward(self, a_img: torch.Tensor, a_txt: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pw = self.pos_weight if self.positive_weights else None
        return label_constraint_loss(self.head, a_img, a_txt, targets, pw, self.reduction, self.alpha)


class LabelConstraintMixin:
    """Adds CASC's label constraint (switch `label_constraint`) to a RetrievalModule; see the module docstring."""

    def init_label_constraint(self, enabled: bool, settings: dict | None, embed_dim: int) -> None:
        """Call after save_hyperparameters: `enabled` and `settings` are the method's label_constraint /
        label_settings arguments."""
        if not isinstance(enabled, bool):
            raise ValueError(f"label_constraint must be true or false, got {enabled!r}")
        if not enabled:
            if settings:
                raise ValueError("label_settings given but label_constraint is false: set label_constraint: true")
            return
        self._label_settings = label_settings(settings)
        self._label_dim = embed_dim
        self.label_words: list[str] | None = None
        self.label_assignment: str | None = None
        self.label_source: str | None = None
        if self._label_settings["num_labels"] is not None:
            self._build_label_constraint(int(self._label_settings["num_labels"]))

    @property
    def uses_label_constraint(self) -> bool:
        return getattr(self, "_label_settings", None) is not None

    @property
    def label_constraint(self) -> LabelConstraint | None:
        return self._modules.get("label_constraint_module")

    def _build_label_constraint(self, num_labels: int) -> None:
        s = self._label_settings
        self.label_constraint_module = LabelConstraint(self._label_dim, num_labels, int(s["hidden"]),
                                                       float(s["alpha"]), s["reduction"], bool(s["positive_weights"]))
        # hparams keep label_settings as given (a resume compares them with the recipe's); a checkpoint rebuilds
        # the head from its stored label dictionary (on_load_checkpoint, before the weights load)
        s["num_labels"] = num_labels

    def matched_attended_vectors(self, img: Emb, cap: Emb) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not expose per-pair attended vectors, so it cannot "
                                  "take CASC's label constraint")

    @property
    def required_inputs(self) -> tuple[str, ...]:
        base = tuple(getattr(super(), "required_inputs", ()))
        return base + ("labels",) if self.uses_label_constraint and "labels" not in base else base

    def configure_from_data(self, datamodule) -> None:
        super().configure_from_data(datamodule)
        if not self.uses_label_constraint:
            return
        words = list(datamodule.labels.words)
        assignment = getattr(datamodule.labels, "assignment", None)
        source = str(getattr(datamodule, "label_path", "the data's label dictionary"))
        if self.label_words is not None:  # loaded from a checkpoint first
            check_label_dictionary(words, assignment, source, self.label_words, self.label_assignment)
        self.label_words, self.label_assignment, self.label_source = words, assignment, source
        if self.label_constraint is None:
            self._build_label_constraint(len(words))
        elif self.label_constraint.num_labels != len(words):
            raise ValueError(f"model has {self.label_constraint.num_labels} labels but the data's label dictionary "
                             f"has {len(words)}: use the same data.num_labels / data.label_pos as in training")
        if self.label_constraint.positive_weights:
            self.label_constraint.pos_weight.copy_(datamodule.label_pos_weights.to(self.label_constraint.pos_weight))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.uses_label_constraint:
            checkpoint["zoo_data"]["label_words"] = self.label_words
            checkpoint["zoo_data"]["label_assignment"] = self.label_assignment

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        words = checkpoint.get("zoo_data", {}).get("label_words")
        if not self.uses_label_constraint or words is None:
            return
        assignment = checkpoint["zoo_data"].get("label_assignment")
        if self.label_constraint is None:  # load_from_checkpoint without data: the head's size is the dictionary's
            self._build_label_constraint(len(words))
        if self.label_words is not None:
            check_label_dictionary(self.label_words, self.label_assignment, self.label_source, words, assignment)
        self.label_words, self.label_assignment = words, assignment

    def training_losses(self, batch: dict, img: Emb, cap: Emb) -> dict[str, torch.Tensor]:
        losses = super().training_losses(batch, img, cap)
        if self.uses_label_constraint:
            if self.label_constraint is None:
                raise RuntimeError("the label constraint needs the label dictionary: train with data.with_labels: "
                                   "true (or give label_settings.num_labels)")
            a_img, a_txt = self.matched_attended_vectors(img, cap)
            # Eq. (12): the method's own ranking loss + alpha * Eq. (11) (alpha inside the module)
            losses["label"] = self.label_constraint(a_img, a_txt, batch["labels"])
        return losses

    def configure_optimizers(self):
        """Off: the method's optimiser. On: the label head as a second Adam group at label_settings.lr x
        lr_decay^floor(epoch / lr_decay_epochs) (CASC's released schedule), the rest at the method's lr."""
        if self.label_constraint is None:
            return super().configure_optimizers()
        s = self._label_settings
        head_ids = {id(p) for p in self.label_constraint.parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in head_ids], "lr": self.lr},
                  {"params": list(self.label_constraint.parameters()), "lr": float(s["lr"])}]
        opt = torch.optim.Adam(groups)
        step = lambda every, gamma: (lambda e: gamma ** (e // every) if every else 1.0)  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [step(self.lr_decay_epochs, self.lr_decay),
                                                        step(int(s["lr_decay_epochs"]), float(s["lr_decay"]))])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


__all__ = ["LABEL_DEFAULTS", "LabelConstraint", "LabelConstraintMixin", "check_label_dictionary", "label_settings"]
