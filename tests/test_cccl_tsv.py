"""Bottom-up-attention TSV -> {split}_ims.npy + {split}_boxes.npy (datamodules.convert_tsv)."""
import base64
import os
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


def _row(image_id, w, h, boxes, feats):
    return "\t".join([image_id, str(w), str(h), str(len(boxes)), _b64(boxes), _b64(feats)])


@pytest.mark.parametrize("w, boxes, feats, message", [
    ("inf", [[0, 0, 5, 5]] * 3, None, "image size inf x 10"),
    ("nan", [[0, 0, 5, 5]] * 3, None, "image size nan x 10"),
    ("1e30", [[0, 0, 5, 5]] * 3, None, "image size 1e"),
    ("300", [[0, 0, 720, 5]] + [[0, 0, 5, 5]] * 2, None, r"falls outside its 300 x 10 image by 140%"),
    ("10", [[0, 0, float("nan"), 5]] + [[0, 0, 5, 5]] * 2, None, "NaN/Inf in its boxes"),
    ("10", [[0, 0, 5, 5]] * 3, "nan", r"NaN/Inf in the features of box\(es\) \[1\]"),
])
def test_converter_refuses_wrong_sizes_boxes_and_nan(tmp_path, w, boxes, feats, message):
    """A wrong image size used to give zero-width (1e30/inf) or silently clipped (300 px for boxes reaching 720)
    boxes, and NaN features surfaced only at training."""
    f = np.ones((3, 5), np.float32)
    if feats == "nan":
        f[1, 2] = np.nan
    (tmp_path / "a.tsv").write_text(_row("1", w, 10, np.array(boxes, np.float32), f) + "\n")
    with pytest.raises(DataError, match=message):
        convert_tsv([tmp_path / "a.tsv"], ["1"], tmp_path / "o", "dev", 3, 5, progress=False)
    assert not list((tmp_path / "o").glob("*.npy")) and not list((tmp_path / "o").glob(".*tmp"))
    # within the tolerance (2% of a side) boxes are clipped, as detectors' rounding needs
    (tmp_path / "b.tsv").write_text(_row("1", 10, 10, np.array([[-0.1, 0, 10.1, 10]] * 3, np.float32),
                                         np.ones((3, 5), np.float32)) + "\n")
    convert_tsv([tmp_path / "b.tsv"], ["1"], tmp_path / "o", "dev", 3, 5, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "dev_boxes.npy")[0, 0], [0, 0, 1, 1])


def test_converter_removes_the_tmp_files_of_a_killed_run(tmp_path, capsys):
    """SIGKILL leaves full-size hidden .tmp files (no finally runs): the next start removes them and says so;
    a conversion still running (its pid alive) keeps its own."""
    write_tsv(tmp_path / "a.tsv", {"1": (10, 10)})
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [out / ".dev_ims.npy.tmp", out / f".dev_boxes.npy.{dead}.tmp"]
    live = out / f".dev_ims.npy.{os.getppid()}.tmp"
    other = out / ".dev2_ims.npy.tmp"
    for t in (*stale, live, other):
        t.write_bytes(b"\0" * 1024)
    convert_tsv([tmp_path / "a.tsv"], ["1"], out, "dev", 3, 5, progress=False)
    err = capsys.readouterr().err
    assert all(not t.exists() for t in stale) and live.exists() and other.exists()
    assert "left by a killed conversion" in err and str(stale[0]) in err
