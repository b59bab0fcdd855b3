"""Bench specs of the zoo's methods (`python -m zoo.bench methods`): how to build each at a size and make its inputs.

A new method registers its own spec here (or in its own module) with `@register_bench(MethodClass)`; see
`BenchSpec` in zoo.bench.common and README, "Adding a method to the bench".
"""
from __future__ import annotations

import torch

from ..methods import CASC, CCCL, DAN, SGRAF, SMLSTM, VSEPP, CASCBase, VSEInfinity
from .common import BenchSpec, coco_lengths, random_tokens, register_bench


@register_bench(CASCBase)
class CASCBaseBench(BenchSpec):
    name = "casc_base"
    regions = 36
    feature_dim = 2048

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return CASCBase(vocab_size=vocab, feature_dim=self.feature_dim, embed_dim=dim, fold_size=None)

    def eval_inputs(self, model, n_images, dim, g):
        lengths = coco_lengths(5 * n_images, g)
        unit = torch.nn.functional.normalize
        img = {"regions": unit(torch.randn(n_images, self.regions, dim, generator=g), dim=-1)}
        words = unit(torch.randn(lengths.shape[0], int(lengths.max()), dim, generator=g), dim=-1)
        words[torch.arange(words.shape[1])[None] >= lengths[:, None]] = 0  # encoders zero the padding
        return img, {"words": words, "lengths": lengths}

    def train_batch(self, model, batch, vocab, g):
        lengths = coco_lengths(batch, g)
        return {"images": torch.randn(batch, self.regions, self.feature_dim, generator=g),
                "tokens": random_tokens(lengths, vocab, g), "lengths": lengths, "image_ids": torch.arange(batch)}


@register_bench(CASC)
class CASCBench(CASCBaseBench):
    """CASC with its label branch (K labels): S_G reading (a) in evaluation, the label loss in training. The
    reference column is CASC's reference path: the slow local scorer and S_G over the padded block."""

    name = "casc"
    labels = 500  # the paper's K

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return CASC(vocab_size=vocab, num_labels=self.labels, feature_dim=self.feature_dim, embed_dim=dim,
                    fold_size=None)

    def eval_inputs(self, model, n_images, dim, g):
        img, cap = super().eval_inputs(model, n_images, dim, g)
        dev = next(model.parameters()).device
        with torch.no_grad():  # per item, as CASC.encode_images / encode_captions do
            img["regions_proj"] = model.label_head.project(img["regions"].to(dev)).cpu()
            cap["words_proj"] = model.label_head.project(cap["words"].to(dev)).cpu()
        img["image_ids"] = torch.arange(n_images)
        cap["caption_ids"] = torch.arange(cap["words"].shape[0])
        return img, cap

    def train_batch(self, model, batch, vocab, g):
        labels = (torch.rand(batch, self.labels, generator=g) < 0.01).float()  # ~5 labels per image
        return {**super().train_batch(model, batch, vocab, g), "labels": labels, "caption_ids": torch.arange(batch)}


@register_bench(CCCL)
class CCCLBench(BenchSpec):
    """CCCL (BiGRU text encoder, "w/o BERT"; all three branches, VSF, MLP scorer) at d, P = 256.

    The reference column is CCCL's per-pair loop (CCCLNet.slow_branch_scores, nn.GRU per pair), so the default
    sizes are small: Branch 3's context GRU runs per pair (~2 x 49 GRU steps at d = 1024), which makes CCCL
    orders of magnitude costlier per pair than CASC on any path."""

    name = "cccl"
    regions = 36
    feature_dim = 2048
    default_images = 4
    default_batches = (8,)

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return CCCL(vocab_size=vocab, feature_dim=self.feature_dim, embed_dim=dim, sim_dim=min(256, dim),
                    text_encoder="bigru", fold_size=None)

    def raw_images(self, n: int, g: torch.Generator) -> dict:
        corner = torch.rand(n, self.regions, 2, generator=g) * 0.6
        return {"images": torch.randn(n, self.regions, self.feature_dim, generator=g),
                "boxes": torch.cat([corner, corner + 0.1 + 0.3 * torch.rand(n, self.regions, 2, generator=g)], -1)}

    def raw_captions(self, n: int, vocab: int, g: torch.Generator) -> dict:
        lengths = coco_lengths(n, g)
        length = int(lengths.max())
        adjacency = torch.zeros(n, length, length)
        for c, m in enumerate(lengths.tolist()):  # a chain of dependency arcs over the words (not <start>/<end>)
            i = torch.arange(1, m - 2)
            adjacency[c, i, i + 1] = adjacency[c, i + 1, i] = 1.0
        return {"tokens": random_tokens(lengths, vocab, g), "lengths": lengths, "adjacency": adjacency}

    def eval_inputs(self, model, n_images, dim, g):
        dev = next(model.parameters()).device
        vocab = model.net.bigru.embed.num_embeddings
        raw_img, raw_cap = self.raw_images(n_images, g), self.raw_captions(5 * n_images, vocab, g)
        with torch.no_grad():
            img = model.encode_images({k: v.to(dev) for k, v in raw_img.items()})
            cap = model.encode_captions({k: v.to(dev) for k, v in raw_cap.items()})
        return img, cap

    def train_batch(self, model, batch, vocab, g):
        return {**self.raw_images(batch, g), **self.raw_captions(batch, vocab, g), "image_ids": torch.arange(batch)}


@register_bench(SGRAF)
class SGRAFBench(CASCBaseBench):
    """SGRAF-SGR (the costlier module: 3 graph steps over the 1 + L alignment vectors) at sim_dim = min(256, d).

    The reference column is the official loop over captions, each cut to its real words (SGRAF.reference_score);
    the fast path scores blocks of captions at once within SGRAF's pair budget."""

    name = "sgraf"
    default_images = 20
    default_batches = (32,)

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return SGRAF(vocab_size=vocab, feature_dim=self.feature_dim, embed_dim=dim, sim_dim=min(256, dim),
                     module="SGR", fold_size=None)

    def eval_inputs(self, model, n_images, dim, g):
        img, cap = super().eval_inputs(model, n_images, dim, g)
        dev = next(model.parameters()).device
        with torch.no_grad():  # the VisualSA / TextSA poolings, as SGRAF.encode_images / encode_captions form them
            mask = torch.arange(cap["words"].shape[1])[None] < cap["lengths"][:, None]
            img["glo"] = model.v_global(img["regions"].to(dev)).cpu()
            cap["glo"] = model.t_global(cap["words"].to(dev), mask.to(dev)).cpu()
        return img, cap


@register_bench(VSEInfinity)
class VSEInfinityBench(BenchSpec):
    """VSE-infinity (BiGRU): a dot product of pooled vectors in evaluation, so the training step is what differs:
    the reference runs GPO one set at a time (zoo.blocks.slow_gpo) and the packed nn.GRU text encoder."""

    name = "vse_infinity"
    regions = 36
    feature_dim = 2048

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return VSEInfinity(vocab_size=vocab, feature_dim=self.feature_dim, embed_dim=dim, fold_size=None)

    def eval_inputs(self, model, n_images, dim, g):
        unit = torch.nn.functional.normalize
        return ({"vector": unit(torch.randn(n_images, dim, generator=g), dim=-1)},
                {"vector": unit(torch.randn(5 * n_images, dim, generator=g), dim=-1)})

    def train_batch(self, model, batch, vocab, g):
        lengths = coco_lengths(batch, g)
        return {"images": torch.randn(batch, self.regions, self.feature_dim, generator=g),
                "tokens": random_tokens(lengths, vocab, g), "lengths": lengths, "image_ids": torch.arange(batch)}


@register_bench(VSEPP)
class VSEPPBench(VSEInfinityBench):
    """VSE++ (one vector per image, GRU last state): no separate reference path, so the ratio is ~1 by design."""

    name = "vsepp"
    regions = 1
    feature_dim = 4096

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return VSEPP(vocab_size=vocab, feature_dim=self.feature_dim, embed_dim=dim, fold_size=None)


@register_bench(DAN)
class DANBench(VSEInfinityBench):
    """DAN (m-DAN, K = 2): S is a dot product of per-item step vectors (separate memories), so evaluation is one
    matrix product and there is no separate reference path: the ratio is ~1 by design; the training step (two
    attention steps per modality, BiLSTM) is what it costs."""

    name = "dan"

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return DAN(vocab_size=vocab, feature_dim=self.feature_dim, embed_dim=dim, hidden_dim=dim, fold_size=None)

    def eval_inputs(self, model, n_images, dim, g):
        unit = torch.nn.functional.normalize
        k = model.hparams.steps + 1
        return ({"vector": unit(torch.randn(n_images, k * dim, generator=g), dim=-1)},
                {"vector": unit(torch.randn(5 * n_images, k * dim, generator=g), dim=-1)})


@register_bench(SMLSTM)
class SMLSTMBench(CASCBaseBench):
    """sm-LSTM (T = 3 steps, hidden = d): the multimodal LSTM runs for every image-caption pair, so it is priced
    per pair like CASC. The reference column is the per-caption loop (SMLSTM.reference_score), each caption cut to
    its real words; the fast path scores the whole block at once."""

    name = "smlstm"
    default_images = 20
    default_batches = (32,)

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return SMLSTM(vocab_size=vocab, feature_dim=self.feature_dim, embed_dim=dim, hidden_dim=min(256, dim),
                      fold_size=None)

    def eval_inputs(self, model, n_images, dim, g):
        img, cap = super().eval_inputs(model, n_images, dim, g)
        mask = torch.arange(cap["words"].shape[1])[None] < cap["lengths"][:, None]
        img["global"] = torch.nn.functional.normalize(img["regions"].mean(1), dim=-1)
        mean = (cap["words"] * mask[..., None]).sum(1) / cap["lengths"][:, None]
        cap["global"] = torch.nn.functional.normalize(mean, dim=-1)
        return img, cap
