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
