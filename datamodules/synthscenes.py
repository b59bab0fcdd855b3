"""SynthScenes: a procedural image-text benchmark written in the standard precomputed-feature layout.

Each image is a scene of several objects (category, colour, size, action, count) on a background, with a
position (box) per object. A simulated "detector" gives every object a few noisy regions whose features
bind the object's category *and* its attributes together (so "a red dog and a blue ball" differs from
"a blue dog and a red ball"), fills the remaining regions with background/clutter, and misses some
objects altogether. Region features never encode position: spatial relations in the captions
("a dog to the left of a ball") are recoverable only from {split}_boxes.npy.
Captions (5 per image) come from a small grammar naming random subsets of the scene.

`twins=True` (an option; the default data is unchanged) writes every scene twice, the second a mirror image of
the first. Each caption then states a left/right relation between two named objects, so within a pair of twins
only the boxes decide which image a caption describes; a model that reads no boxes can do no better than a
coin flip between the two (data where box position features can show what they do: CCCL's "w/o POS" row).
`twin_regions` says what else the twin shares:
- "same" (default): the very same region features in the same order; only the boxes are mirrored. Nothing but the
  boxes tells twins apart, in training too.
- "resampled" (the first version, kept for its reports): the same detections (concept mixes) with fresh feature
  noise, in another order. A model can then memorise which noisy copy a training caption goes with: CASC-base,
  which reads no boxes, tells 75 % of its *training* twins apart after 8 epochs and 50 % of the test twins, so the
  twins teach noise instead of positions (README, "Box positions on twin scenes").

Deterministic given (seed, sizes): the concept space comes from `world_seed`, shared by all splits.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

CATEGORIES = ["dog", "cat", "horse", "bird", "cow", "sheep", "man", "woman", "child", "ball", "car", "bike", "boat",
              "kite", "umbrella", "bag", "hat", "bench", "chair", "table", "cup", "bottle", "guitar", "book", "lamp",
              "clock", "bus", "truck", "frisbee", "tree"]
ANIMATE = {"dog", "cat", "horse", "bird", "cow", "sheep", "man", "woman", "child"}
PLURAL = {"man": "men", "woman": "women", "child": "children", "sheep": "sheep", "bus": "buses"}
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink", "purple"]
SIZES = ["small", "large"]
ACTIONS = ["running", "sitting", "jumping", "sleeping", "eating", "standing"]
SCENES = {"grass": "on the grass", "beach": "on the beach", "street": "in the street", "room": "in a room",
          "snow": "in the snow", "water": "near the water", "park": "in the park", "kitchen": "in a kitchen"}
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
NUMBERS = {2: "two", 3: "three"}
N_CLUTTER = 50
TWIN_REGIONS = ("same", "resampled")


@dataclass
class SynthScenesConfig:
    n_train: int = 3000
    n_dev: int = 500
    n_test: int = 1000
    num_regions: int = 36
    feature_dim: int = 2048
    seed: int = 0
    world_seed: int = 1234
    min_objects: int = 2
    max_objects: int = 5
    regions_per_object: tuple[int, int] = (1, 3)
    miss_prob: float = 0.1  # an object the detector does not see at all
    noise: float = 1.0
    attribute_strength: float = 0.8
    caps_per_image: int = 5
    version: int = 1
    splits: dict = field(default_factory=dict)
    twins: bool = False  # mirror-image twin scenes whose captions state left/right relations (module docstring)
    twin_regions: str = "same"  # what a twin shares besides the mirrored scene: TWIN_REGIONS (module docstring)

    def digest(self) -> str:
        d = asdict(self)
        if not d["twins"]:  # options added later leave the default data's digest (and its caches) as they were
            del d["twins"], d["twin_regions"]
        elif d["twin_regions"] == "resampled":  # the first twins, from before twin_regions: their digest as it was
            del d["twin_regions"]
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class _World:
    """The concept space: one random direction per category, colour, size, action, scene, clutter item."""

    def __init__(self, cfg: SynthScenesConfig):
        rng = np.random.default_rng(cfg.world_seed)
        names = ([f"cat:{c}" for c in CATEGORIES] + [f"col:{c}" for c in COLOURS] + [f"size:{s}" for s in SIZES]
                 + [f"act:{a}" for a in ACTIONS] + [f"scene:{s}" for s in SCENES] + [f"clutter:{i}" for i in range(N_CLUTTER)])
        self.index = {n: i for i, n in enumerate(names)}
        self.vectors = rng.standard_normal((len(names), cfg.feature_dim)).astype(np.float32)


def _plural(noun: str) -> str:
    return PLURAL.get(noun, noun + "s")


def _sample_scene(rng: np.random.Generator, cfg: SynthScenesConfig) -> dict:
    n_groups = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cats = rng.choice(len(CATEGORIES), size=n_groups, replace=False)
    groups = []
    for c in cats:
        cat = CATEGORIES[c]
        count = int(rng.choice([1, 1, 1, 1, 2, 3]))
        grp = {"category": cat, "colour": COLOURS[rng.integers(len(COLOURS))], "count": count,
               "size": SIZES[rng.integers(len(SIZES))] if rng.random() < 0.5 else None,
               "action": ACTIONS[rng.integers(len(ACTIONS))] if cat in ANIMATE else None, "boxes": []}
        cx, cy = rng.uniform(0.15, 0.85, size=2)
        for _ in range(count):
            w, h = rng.uniform(0.1, 0.3, size=2)
            x, y = np.clip(cx + rng.normal(0, 0.04), w / 2, 1 - w / 2), np.clip(cy + rng.normal(0, 0.04), h / 2, 1 - h / 2)
            grp["boxes"].append([x - w / 2, y - h / 2, x + w / 2, y + h / 2])
        groups.append(grp)
    return {"scene": list(SCENES)[rng.integers(len(SCENES))], "groups": groups}


def _horizontal_pairs(scene: dict) -> list[tuple[int, int]]:
    """(i, j) with group i to the left or right of group j, as _relation reads it."""
    g = scene["groups"]
    return [(i, j) for i in range(len(g)) for j in range(len(g)) if i != j and _relation(g[i], g[j]) in ("left", "right")]


def _sample_twin_scene(rng: np.random.Generator, cfg: SynthScenesConfig) -> dict:
    """A scene with at least one left/right pair of groups (so each caption can state one)."""
    while True:
        scene = _sample_scene(rng, cfg)
        if _horizontal_pairs(scene):
            return scene


def _mirror_boxes(boxes: np.ndarray) -> np.ndarray:
    """Normalised (x1, y1, x2, y2) boxes [R, 4] reflected left-right: x -> 1 - x."""
    return np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)


def _mirror(scene: dict) -> dict:
    """The scene reflected left-right: x -> 1 - x for every box (relations left <-> right)."""
    groups = [{**g, "boxes": [[1 - x2, y1, 1 - x1, y2] for x1, y1, x2, y2 in g["boxes"]]} for g in scene["groups"]]
    return {**scene, "groups": groups}


def _describe(grp: dict, rng: np.random.Generator) -> str:
    words = []
    if grp["size"] and rng.random() < 0.5:
        words.append(grp["size"])
    if rng.random() < 0.85:
        words.append(grp["colour"])
    if grp["count"] > 1:
        phrase = " ".join([NUMBERS[grp["count"]]] + words + [_plural(grp["category"])])
    else:
        phrase = " ".join(["a"] + words + [grp["category"]])
    return phrase


def _relation(a: dict, b: dict) -> str | None:
    ca, cb = np.mean(a["boxes"], axis=0), np.mean(b["boxes"], axis=0)
    ax, ay, bx, by = (ca[0] + ca[2]) / 2, (ca[1] + ca[3]) / 2, (cb[0] + cb[2]) / 2, (cb[1] + cb[3]) / 2
    dx, dy = bx - ax, by - ay
    if max(abs(dx), abs(dy)) < 0.15:
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"  # image y grows downwards


def _caption(scene: dict, rng: np.random.Generator, left_right: bool = False) -> str:
    """left_right: the caption starts with a pair of groups and always states their left/right relation."""
    groups = scene["groups"]
    if left_right:
        pairs = _horizontal_pairs(scene)
        i, j = pairs[rng.integers(len(pairs))]
        rest = [g for n, g in enumerate(groups) if n not in (i, j)]
        picked = [groups[i], groups[j]] + ([rest[rng.integers(len(rest))]] if rest and rng.random() < 0.3 else [])
    else:
        k = int(rng.choice([1, 2, 2, 3])) if len(groups) >= 3 else int(rng.integers(1, len(groups) + 1))
        picked = [groups[i] for i in rng.choice(len(groups), size=min(k, len(groups)), replace=False)]
    first = picked[0]
    text = _describe(first, rng)
    if first["action"] and rng.random() < 0.6:
        text += (" are " if first["count"] > 1 else " is ") + first["action"]
    if len(picked) >= 2:
        rel = _relation(first, picked[1]) if left_right or rng.random() < 0.5 else None
        text += (" " + RELATIONS[rel] + " " if rel else " and ") + _describe(picked[1], rng)
        for g in picked[2:]:
            text += " and " + _describe(g, rng)
    if rng.random() < 0.4:
        text += " " + SCENES[scene["scene"]]
    if rng.random() < 0.3:
        text = "there is " + text if first["count"] == 1 else "there are " + text
    return text + " ."


def _render(scene: dict, rng: np.random.Generator, world: _World, cfg: SynthScenesConfig):
    """Mixing weights [R, concepts] and boxes [R, 4] of the detector's regions for one scene."""
    R = cfg.num_regions
    mix = np.zeros((R, len(world.index)), dtype=np.float32)
    boxes = np.zeros((R, 4), dtype=np.float32)
    r = 0
    for grp in scene["groups"]:
        for box in grp["boxes"]:
            if rng.random() < cfg.miss_prob:
                continue
            for _ in range(int(rng.integers(cfg.regions_per_object[0], cfg.regions_per_object[1] + 1))):
                if r >= R:
                    break
                mix[r, world.index[f"cat:{grp['category']}"]] = rng.uniform(0.7, 1.2)
                mix[r, world.index[f"col:{grp['colour']}"]] = cfg.attribute_strength * rng.uniform(0.5, 1.2)
                if grp["size"]:
                    mix[r, world.index[f"size:{grp['size']}"]] = 0.5 * cfg.attribute_strength * rng.uniform(0.5, 1.2)
                if grp["action"]:
                    mix[r, world.index[f"act:{grp['action']}"]] = 0.6 * cfg.attribute_strength * rng.uniform(0.5, 1.2)
                jit = rng.normal(0, 0.02, size=4)
                boxes[r] = np.clip(np.array(box) + jit, 0, 1)
                r += 1
    for q in range(r, R):  # background and clutter the captions never name
        mix[q, world.index[f"scene:{scene['scene']}"]] = rng.uniform(0.3, 1.0)
        mix[q, world.index[f"clutter:{rng.integers(N_CLUTTER)}"]] = rng.uniform(0.5, 1.2)
        x1, y1 = rng.uniform(0, 0.8, size=2)
        boxes[q] = [x1, y1, min(1.0, x1 + rng.uniform(0.05, 0.4)), min(1.0, y1 + rng.uniform(0.05, 0.4))]
    boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0])
    boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1])
    perm = rng.permutation(R)  # detectors return regions in no particular order
    return mix[perm], boxes[perm]


def generate_split(root: Path, split: str, n_images: int, cfg: SynthScenesConfig, world: _World, seed: int,
                   progress: bool = True) -> None:
    if cfg.twins and n_images % 2:
        raise ValueError(f"SynthScenes twins: the {split} split has {n_images} images; twin scenes come in pairs, "
                         f"so give an even n_{split}")
    rng = np.random.default_rng(seed)
    feats = np.lib.format.open_memmap(root / f"{split}_ims.npy.tmp", mode="w+", dtype=np.float32,
                                      shape=(n_images, cfg.num_regions, cfg.feature_dim))
    boxes = np.zeros((n_images, cfg.num_regions, 4), dtype=np.float32)
    captions, scenes = [], []
    step = 256
    for a in tqdm(range(0, n_images, step), desc=f"SynthScenes {split}", disable=not progress, leave=False):
        b = min(a + step, n_images)
        mixes = []
        for i in range(a, b):
            if not cfg.twins:
                scene = _sample_scene(rng, cfg)
                mix, boxes[i] = _render(scene, rng, world, cfg)
            elif i % 2 == 0:  # step is even, so a pair never straddles two chunks
                scene = _sample_twin_scene(rng, cfg)
                mix, boxes[i] = _render(scene, rng, world, cfg)
                twin_mix, twin_boxes = mix, boxes[i].copy()
            elif cfg.twin_regions == "same":  # the mirror image of scene i - 1: its very regions, boxes mirrored
                scene = _mirror(scenes[-1])
                mix = twin_mix
                boxes[i] = _mirror_boxes(twin_boxes)
            else:  # the mirror image of scene i - 1: the same detections, mirrored boxes, another region order
                scene = _mirror(scenes[-1])
                perm = rng.permutation(cfg.num_regions)
                mix = twin_mix[perm]
                boxes[i] = _mirror_boxes(twin_boxes)[perm]
            mixes.append(mix)
            captions += [_caption(scene, rng, left_right=cfg.twins) for _ in range(cfg.caps_per_image)]
            scenes.append(scene)
        x = np.stack(mixes) @ world.vectors
        x += cfg.noise * rng.standard_normal(x.shape, dtype=np.float32)
        if cfg.twins and cfg.twin_regions == "same":
            x[1::2] = x[0::2]  # a twin's features are its scene's, noise included (chunks start at even images)
        feats[a:b] = np.maximum(x, 0.0)  # bottom-up features are post-ReLU, non-negative
    feats.flush()
    del feats
    np.save(root / f"{split}_boxes.npy", boxes)
    (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    (root / f"{split}_scenes.json").write_text(json.dumps(scenes))
    (root / f"{split}_ims.npy.tmp").replace(root / f"{split}_ims.npy")


def generate_synthscenes(root: str | Path, cfg: SynthScenesConfig | None = None, progress: bool = True) -> Path:
    """Writes train/dev/test splits under root (skipped when a matching copy is already there)."""
    cfg = cfg or SynthScenesConfig()
    root = Path(root)
    stamp = root / "synthscenes.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("digest") == cfg.digest():
        return root
    root.mkdir(parents=True, exist_ok=True)
    world = _World(cfg)
    for i, (split, n) in enumerate((("train", cfg.n_train), ("dev", cfg.n_dev), ("test", cfg.n_test))):
        generate_split(root, split, n, cfg, world, seed=cfg.seed * 1000 + i, progress=progress)
    stamp.write_text(json.dumps({"digest": cfg.digest(), "config": asdict(cfg)}, indent=1))
    return root


def _datamodule_base():
    from .precomp import PrecompDataModule

    return PrecompDataModule


def _sampler_base():
    from .precomp import EpochShuffleSampler

    return EpochShuffleSampler


class TwinPairSampler(_sampler_base()):
    """Training order for twin scenes that puts a caption of a twin next to the same-numbered caption of the other
    ((10k + j, 10k + 5 + j) for caps_per_image 5), for a `share` of all such pairs; the other captions come alone.
    Units (pairs and singles) are shuffled by (seed, epoch) as EpochShuffleSampler does. A paired caption meets its
    image's twin as an in-batch negative, the one negative only the boxes can tell apart; with random batches it
    meets it with probability ~ batch / images, too rarely for box features to learn anything (README, CCCL)."""

    def __init__(self, n: int, caps_per_image: int, seed: int = 0, share: float = 1.0):
        super().__init__(n, seed)
        self.caps, self.share = caps_per_image, share

    def __iter__(self):
        import torch
        idx = torch.arange(self.n).view(-1, 2, self.caps)  # [pairs of images, twin, caption]
        pairs = idx.permute(0, 2, 1).reshape(-1, 2)  # (caption j of image 2k, caption j of image 2k + 1)
        g = self.generator()
        pairs = pairs[torch.randperm(pairs.shape[0], generator=g)]
        flip = torch.rand(pairs.shape[0], generator=g) < 0.5  # which twin comes first: no fixed parity
        pairs = torch.where(flip[:, None], pairs.flip(1), pairs).tolist()
        k = round(self.share * len(pairs))
        units = pairs[:k] + [[i] for p in pairs[k:] for i in p]
        order = torch.randperm(len(units), generator=g).tolist()
        return iter([i for u in order for i in units[u]])


class SynthScenesDataModule(_datamodule_base()):
    """PrecompDataModule over SynthScenes, generated into `root` on first use (deterministic by seed).

    Sizes and difficulty are arguments; everything else (batching, boxes, graphs) is PrecompDataModule's.
    twins: mirror-image twin scenes with left/right captions (module docstring); n_train/n_dev/n_test even.
    twin_regions: "same" (a twin has its scene's very features, only the boxes mirrored) or "resampled" (fresh
        noise, another region order: the first twins, which a model can tell apart in training by their noise).
    twin_batches: the share of training captions served beside a caption of their twin (TwinPairSampler; 0 = the
        usual random order). Needs twins and one process (DDP's sampler wrapper would deal a pair to two ranks).
    """

    def __init__(self, root: str = ".cache/synthscenes", n_train: int = 3000, n_dev: int = 500, n_test: int = 1000,
                 seed: int = 0, num_regions: int = 36, feature_dim: int = 2048, noise: float = 1.0,
                 miss_prob: float = 0.1, twins: bool = False, twin_regions: str = "same", twin_batches: float = 0.0,
                 **kwargs):
        from .precomp import check_sizes
        check_sizes(n_train=n_train, n_dev=n_dev, n_test=n_test)
        if not 0.0 <= twin_batches <= 1.0:
            from .errors import DataError
            raise DataError(None, f"data.twin_batches is {twin_batches!r}", "give a share between 0 and 1")
        if twin_regions not in TWIN_REGIONS:
            from .errors import DataError
            raise DataError(None, f"data.twin_regions is {twin_regions!r}", f"use one of {', '.join(TWIN_REGIONS)}")
        if twin_batches and not twins:
            from .errors import DataError
            raise DataError(None, "data.twin_batches groups twin scenes, but data.twins is false",
                            "set data.twins: true (or drop twin_batches)")
        odd = [f"n_{k}={v}" for k, v in (("train", n_train), ("dev", n_dev), ("test", n_test)) if twins and v % 2]
        if odd:
            from .errors import DataError
            raise DataError(None, f"SynthScenes twins come in pairs, but {', '.join(odd)} is odd",
                            "give even split sizes with data.twins: true")
        kwargs.setdefault("val_max_images", None)
        kwargs.setdefault("test_split", "test")
        super().__init__(root, num_regions=num_regions, feature_dim=feature_dim, **kwargs)
        self.synth_config = SynthScenesConfig(n_train=n_train, n_dev=n_dev, n_test=n_test, seed=seed,
                                              num_regions=num_regions, feature_dim=feature_dim, noise=noise,
                                              miss_prob=miss_prob, caps_per_image=self.caps_per_image,
                                              twins=twins, twin_regions=twin_regions)
        self.twin_batches = twin_batches

    @property
    def twins(self) -> bool:
        """Images 2k and 2k + 1 are mirror twins (evaluation then also logs the twin accuracy)."""
        return self.synth_config.twins

    def train_sampler(self, n: int, seed: int):
        if not self.twin_batches:
            return super().train_sampler(n, seed)
        from .errors import DataError
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            raise DataError(None, f"data.twin_batches needs one process ({trainer.world_size} here): DDP's sampler "
                            "wrapper would deal the two captions of a pair to two ranks",
                            "use trainer.devices: 1, or data.twin_batches: 0")
        return TwinPairSampler(n, self.caps_per_image, seed, self.twin_batches)

    def prepare_data(self) -> None:
        from .prepare import cache_lock
        # two runs generating one new root at once: the second waits for the first, then finds the copy made
        # (released before the vocabulary/parse steps, which take the cache folder's lock themselves)
        with cache_lock(self.root):
            stamp = self.root / "synthscenes.json"
            fresh = not (stamp.exists() and json.loads(stamp.read_text()).get("digest") == self.synth_config.digest())
            if fresh:
                # artifacts of an older copy would not match the new captions
                for old in [*self.cache_dir.glob("vocab*.json"), *self.cache_dir.glob("*_parse.*.npz"),
                            *self.cache_dir.glob("labels.*.json")]:
                    old.unlink()
                generate_synthscenes(self.root, self.synth_config)
        super().prepare_data()
