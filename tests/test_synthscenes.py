import hashlib

import numpy as np

from datamodules.layout import load_split
from datamodules.synthscenes import COLOURS, SynthScenesConfig, _World, generate_synthscenes


def _digest(root):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.glob("*_*.*"))}


def test_deterministic_by_seed_and_in_the_standard_layout(tmp_path):
    cfg = SynthScenesConfig(n_train=20, n_dev=5, n_test=5, feature_dim=64, num_regions=12)
    a = generate_synthscenes(tmp_path / "a", cfg, progress=False)
    b = generate_synthscenes(tmp_path / "b", cfg, progress=False)
    assert _digest(a) == _digest(b)
    c = generate_synthscenes(tmp_path / "c", SynthScenesConfig(**{**cfg.__dict__, "seed": 1}), progress=False)
    assert _digest(a)["train_caps.txt"] != _digest(c)["train_caps.txt"]
    for split, n in (("train", 20), ("dev", 5), ("test", 5)):
        data = load_split(a, split, num_regions=12, feature_dim=64, with_boxes=True)  # all layout checks pass
        assert data.n_images == n and len(data.captions) == 5 * n
        assert (data.image_features(0) >= 0).all()


def test_regions_bind_attributes_to_their_object(tmp_path):
    """An object's region is closest to its own colour among all colours: binding lives in the features."""
    import json

    cfg = SynthScenesConfig(n_train=30, n_dev=5, n_test=5, feature_dim=512, num_regions=36, noise=0.5, miss_prob=0.0)
    root = generate_synthscenes(tmp_path / "s", cfg, progress=False)
    world = _World(cfg)
    feats = np.load(root / "train_ims.npy")
    scenes = json.loads((root / "train_scenes.json").read_text())
    cat = np.stack([world.vectors[world.index[f"cat:{g['category']}"]] for g in scenes[0]["groups"]])
    cols = np.stack([world.vectors[world.index[f"col:{c}"]] for c in COLOURS])
    regions = feats[0]
    for g, cv in zip(scenes[0]["groups"], cat):
        best = regions[np.argmax(regions @ cv)]  # the region that shows this object most
        assert COLOURS[int(np.argmax(cols @ best))] == g["colour"]


def test_the_default_data_is_unchanged_by_the_twins_option():
    """The demo's SynthScenes (recipes/casc_base_synth.yaml sizes) keeps the digest its caches were built under."""
    demo = SynthScenesConfig(n_train=2000, n_dev=200, n_test=500)
    assert demo.digest() == "2ec93f3728c8"  # written before `twins` existed
    assert SynthScenesConfig(n_train=2000, n_dev=200, n_test=500, twins=True).digest() != demo.digest()
    # twin_regions came later: the first twins ("resampled") keep their digest (`make twins` data before it)
    first = SynthScenesConfig(n_train=800, n_dev=100, n_test=200, num_regions=18, twins=True, twin_regions="resampled")
    assert first.digest() == "80e4936c978a"
    assert SynthScenesConfig(n_train=800, n_dev=100, n_test=200, num_regions=18, twins=True).digest() != first.digest()


def test_twin_scenes_differ_only_in_their_mirrored_boxes(tmp_path):
    """Twins 2k, 2k+1: the same detections (rows permuted; no noise here), boxes mirrored left-right, and every
    caption states a left/right relation that holds in its own image and is reversed in its twin."""
    import json
    import re

    from datamodules.synthscenes import RELATIONS, _relation

    cfg = SynthScenesConfig(n_train=12, n_dev=4, n_test=4, feature_dim=64, num_regions=12, noise=0.0, twins=True,
                            twin_regions="resampled")
    root = generate_synthscenes(tmp_path / "t", cfg, progress=False)
    feats, boxes = np.load(root / "train_ims.npy"), np.load(root / "train_boxes.npy")
    scenes = json.loads((root / "train_scenes.json").read_text())
    caps = (root / "train_caps.txt").read_text().splitlines()
    assert len(caps) == 5 * 12
    for k in range(0, 12, 2):
        a, b = feats[k], feats[k + 1]
        order_a, order_b = np.lexsort(a.T[::-1]), np.lexsort(b.T[::-1])
        np.testing.assert_allclose(a[order_a], b[order_b], atol=1e-5)  # the same regions, another order
        mirrored = np.stack([1 - boxes[k][:, 2], boxes[k][:, 1], 1 - boxes[k][:, 0], boxes[k][:, 3]], 1)
        np.testing.assert_allclose(mirrored[order_a], boxes[k + 1][order_b], atol=1e-6)
        assert not np.allclose(boxes[k], boxes[k + 1])
        for i in (k, k + 1):
            groups = {g["category"]: g for g in scenes[i]["groups"]}
            other = {g["category"]: g for g in scenes[i ^ 1]["groups"]}
            for cap in caps[5 * i:5 * i + 5]:
                m = re.search(r"(\w+)(?: (?:is|are) \w+)? (to the left of|to the right of) (?:a|two|three)"
                              r"(?: \w+)*? (\w+)(?: and| in| on| near| \.)", cap)
                assert m, cap
                rel = {v: k2 for k2, v in RELATIONS.items()}[m.group(2)]
                first, second = m.group(1), m.group(3)
                sing = lambda w, g: next(c for c in g if w in (c, c + "s", {"men": "man", "women": "woman",  # noqa: E731
                                                                            "children": "child", "buses": "bus"}.get(w)))
                f, s = sing(first, groups), sing(second, groups)
                assert _relation(groups[f], groups[s]) == rel, cap
                assert _relation(other[f], other[s]) == {"left": "right", "right": "left"}[rel], cap


def test_same_region_twins_share_their_features_noise_and_order_and_only_the_boxes_are_mirrored(tmp_path):
    """twin_regions="same" (the default): a twin's feature rows are its scene's, noise included, in the same order, so
    nothing but the boxes tells a caption's image from its twin, in training too; captions as in the resampled twins."""
    import json

    from datamodules.synthscenes import _relation

    cfg = SynthScenesConfig(n_train=12, n_dev=4, n_test=4, feature_dim=64, num_regions=12, twins=True)
    assert cfg.twin_regions == "same" and cfg.noise > 0
    root = generate_synthscenes(tmp_path / "t", cfg, progress=False)
    feats, boxes = np.load(root / "train_ims.npy"), np.load(root / "train_boxes.npy")
    scenes = json.loads((root / "train_scenes.json").read_text())
    for k in range(0, 12, 2):
        np.testing.assert_array_equal(feats[k], feats[k + 1])
        mirrored = np.stack([1 - boxes[k][:, 2], boxes[k][:, 1], 1 - boxes[k][:, 0], boxes[k][:, 3]], 1)
        np.testing.assert_allclose(mirrored, boxes[k + 1], atol=1e-6)
        assert not np.allclose(boxes[k], boxes[k + 1])
        assert not np.array_equal(feats[k], feats[(k + 2) % 12])  # different scenes stay different
        a, b = scenes[k]["groups"], scenes[k + 1]["groups"]
        flips = {"left": "right", "right": "left", "above": "above", "below": "below", None: None}
        assert all(_relation(b[i], b[j]) == flips[_relation(a[i], a[j])]
                   for i in range(len(a)) for j in range(len(a)) if i != j)


def test_twin_regions_must_be_known():
    import pytest

    from datamodules.errors import DataError
    from datamodules.synthscenes import SynthScenesDataModule

    with pytest.raises(DataError, match="(?s)twin_regions is 'fresh'.*same, resampled"):
        SynthScenesDataModule(root="unused", n_train=10, n_dev=4, n_test=4, twins=True, twin_regions="fresh")


def test_twins_need_even_split_sizes():
    import pytest

    from datamodules.errors import DataError
    from datamodules.synthscenes import SynthScenesDataModule

    with pytest.raises(DataError, match="n_test=5 is odd"):
        SynthScenesDataModule(root="unused", n_train=10, n_dev=4, n_test=5, twins=True)
    SynthScenesDataModule(root="unused", n_train=10, n_dev=4, n_test=5)  # odd is fine without twins


def test_twin_pair_sampler_puts_captions_beside_their_twin():
    from datamodules.synthscenes import TwinPairSampler

    def adjacent_twins(order):
        return sum(a // 10 == b // 10 and a % 5 == b % 5 and a // 5 != b // 5 for a, b in zip(order, order[1:]))

    s = TwinPairSampler(40 * 5, caps_per_image=5, seed=3)
    order = list(s)
    assert sorted(order) == list(range(200))  # every caption once
    for a, b in zip(order[::2], order[1::2]):  # share 1: every caption is paired
        assert a // 10 == b // 10 and a % 5 == b % 5 and (a // 5) != (b // 5)  # caption j of the two twins
    assert list(TwinPairSampler(200, 5, seed=3)) == order  # (seed, epoch) decide the order
    s.set_epoch(1)
    assert list(s) != order
    assert {order[i] // 5 % 2 for i in range(0, 200, 2)} == {0, 1}  # either twin may come first
    half = list(TwinPairSampler(200, 5, seed=3, share=0.5))
    assert sorted(half) == list(range(200)) and 50 <= adjacent_twins(half) <= 60  # 50 pairs, a few by chance
    assert adjacent_twins(list(TwinPairSampler(200, 5, seed=3, share=0.0))) < 10


def test_twin_batches_need_twins_and_a_share():
    import pytest

    from datamodules.errors import DataError
    from datamodules.synthscenes import SynthScenesDataModule

    with pytest.raises(DataError, match="data.twins is false"):
        SynthScenesDataModule(root="unused", twin_batches=0.5)
    with pytest.raises(DataError, match="between 0 and 1"):
        SynthScenesDataModule(root="unused", n_train=10, n_dev=4, n_test=4, twins=True, twin_batches=2)


def test_twin_batches_under_ddp_is_an_error_and_one_process_gets_the_twin_sampler():
    """DDP's DistributedSampler wrapper would deal a caption and its twin's to two ranks: refuse, naming the fix."""
    import types

    import pytest

    from datamodules.errors import DataError
    from datamodules.synthscenes import SynthScenesDataModule, TwinPairSampler

    dm = SynthScenesDataModule(root="unused", n_train=10, n_dev=4, n_test=4, twins=True, twin_batches=0.5)
    dm.trainer = types.SimpleNamespace(world_size=2)
    with pytest.raises(DataError, match=r"(?s)one process \(2 here\).*trainer.devices: 1"):
        dm.train_sampler(50, seed=0)
    dm.trainer = types.SimpleNamespace(world_size=1)
    assert isinstance(dm.train_sampler(50, seed=0), TwinPairSampler)
