"""Bottom-up-attention TSV -> {split}_ims.npy + {split}_boxes.npy (datamodules.convert_tsv)."""
import base64
import subprocess
import sys

import numpy as np
import pytest

from datamodules.convert_tsv import convert_tsv, main
from datamodules.errors import DataError
from datamodules.layout import load_split


def _b64(a):
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes()).decode()


def write_tsv(path, images, nb=3, dim=5, seed=0, duplicate=None):
    """images: {id: (w, h)}; returns {id: (features, pixel boxes)}."""
    rng = np.random.default_rng(seed)
    truth, lines = {}, []
    for image_id, (w, h) in images.items():
        feats = rng.random((nb, dim), dtype=np.float32)
        x1 = rng.uniform(0, w / 2, nb)
        y1 = rng.uniform(0, h / 2, nb)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, nb), y1 + rng.uniform(1, h / 2, nb)], 1)
        truth[image_id] = (feats, boxes.astype(np.float32))
        lines.append("\t".join([image_id, str(w), str(h), str(nb), _b64(boxes), _b64(feats)]))
    if duplicate and duplicate in images:
        lines.append(lines[list(images).index(duplicate)])
    path.write_text("\n".join(lines) + "\n")
    return truth


def test_converter_writes_features_and_normalised_boxes_in_id_order(tmp_path):
    a = write_tsv(tmp_path / "a.tsv", {"11": (100, 50), "12": (640, 480), "99": (10, 10)})
    b = write_tsv(tmp_path / "b.tsv", {"13": (200, 300)}, seed=1)
    truth = {**a, **b}
    ids = ["13", "11", "12"]  # the caption file's order; "99" belongs to another split
    out = tmp_path / "data"
    convert_tsv([tmp_path / "a.tsv", tmp_path / "b.tsv"], ids, out, "test", num_regions=3, feature_dim=5,
                progress=False)
    ims, boxes = np.load(out / "test_ims.npy"), np.load(out / "test_boxes.npy")
    assert ims.shape == (3, 3, 5) and boxes.shape == (3, 3, 4)
    sizes = {"11": (100, 50), "12": (640, 480), "13": (200, 300)}
    for k, i in enumerate(ids):
        w, h = sizes[i]
        np.testing.assert_array_equal(ims[k], truth[i][0])
        np.testing.assert_allclose(boxes[k], np.clip(truth[i][1] / [w, h, w, h], 0, 1), rtol=1e-6)
    # the layout reader accepts the pair as it is
    (out / "test_caps.txt").write_text("\n".join(f"caption {j}" for j in range(15)) + "\n")
    split = load_split(out, "test", num_regions=3, feature_dim=5, with_boxes=True)
    assert split.n_images == 3 and split.boxes.shape == (3, 3, 4)


def test_converter_errors(tmp_path):
    write_tsv(tmp_path / "a.tsv", {"1": (10, 10), "2": (10, 10)})
    out = tmp_path / "o"
    with pytest.raises(DataError, match=r"1 of 3 image ids are not in the TSV.*'7'"):
        convert_tsv([tmp_path / "a.tsv"], ["1", "2", "7"], out, "dev", 3, 5, progress=False)
    with pytest.raises(DataError, match="has 3 boxes, expected 36"):
        convert_tsv([tmp_path / "a.tsv"], ["1"], out, "dev", 36, 5, progress=False)
    with pytest.raises(DataError, match="listed twice"):
        convert_tsv([tmp_path / "a.tsv"], ["1", "1"], out, "dev", 3, 5, progress=False)
    write_tsv(tmp_path / "dup.tsv", {"1": (10, 10), "2": (10, 10)}, duplicate="2")
    with pytest.raises(DataError, match="image 2 appears twice in the TSV"):
        convert_tsv([tmp_path / "dup.tsv"], ["1", "2"], out, "dev", 3, 5, progress=False)
    with pytest.raises(DataError, match="expected num_boxes x 7"):
        convert_tsv([tmp_path / "a.tsv"], ["1"], out, "dev", 3, 7, progress=False)
    assert not list(out.glob("*.npy")) and not list(out.glob(".*tmp"))  # nothing half-written is left


def test_console_entry_point(tmp_path, capsys):
    write_tsv(tmp_path / "a.tsv", {"5": (8, 8)})
    (tmp_path / "ids.txt").write_text("5\n")
    main(["--tsv", str(tmp_path / "a.tsv"), "--ids", str(tmp_path / "ids.txt"), "--split", "train", "--out",
          str(tmp_path / "o"), "--num-regions", "3", "--feature-dim", "5", "--no-progress"])
    assert (tmp_path / "o" / "train_boxes.npy").exists()
    with pytest.raises(SystemExit):
        main(["--tsv", str(tmp_path / "missing.tsv"), "--ids", str(tmp_path / "ids.txt"), "--split", "x", "--out",
              str(tmp_path / "o")])
    assert "TSV file not found" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "datamodules.convert_tsv", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--ids" in out.stdout
