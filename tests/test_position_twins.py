"""`make twins` (zoo.experiments.twins): its rows, the commands they run and the report from finished results."""
import json
from pathlib import Path

from zoo.experiments import twins

ROOT = Path(__file__).resolve().parents[1]


def test_rows_name_their_methods_and_layer_the_twin_data():
    rows = twins.rows(ROOT / "recipes")
    assert [(r.method, r.name) for r in rows] == [("cccl", "cccl"), ("cccl", "cccl_wo_position"),
                                                  ("casc_base", "casc_base")]
    from zoo.experiments.ablate import merged_config, recipe_for, sizes_for
    for r in rows:
        cfg = merged_config(recipe_for(r.method, "synthetic", ROOT / "recipes"), sizes_for(r.method, "synthetic",
                            ROOT / "recipes"), r.path, ROOT / "recipes" / "position_twins" / "_data.yaml")
        data = cfg["data"]["init_args"]
        assert data["twins"] is True and data["twin_batches"] == 0.5 and data["batch_size"] == 32
        assert (data["n_train"], data["num_regions"], data["root"]) == (800, 18, ".cache/synthscenes_twins")
        assert cfg["model"]["init_args"].get("use_box_position", r.method == "cccl") == (r.name == "cccl")


def test_runner_commands_carry_the_data_epochs_and_seed(tmp_path):
    import argparse
    row = twins.rows(ROOT / "recipes")[0]
    args = argparse.Namespace(recipes=ROOT / "recipes", epochs=4, extra=[], runs=tmp_path)
    cmd = twins.runner(row, 1, args, False, {}).commands(row, "fit", None)
    assert cmd[cmd.index("--seed_everything") + 1] == "1" and cmd[cmd.index("--trainer.max_epochs") + 1] == "4"
    assert str(ROOT / "recipes" / "position_twins" / "_data.yaml") in cmd
    assert str(tmp_path / "seed1" / "cccl_synth" / "position_twins" / "cccl") in cmd


def test_report_from_finished_results(tmp_path):
    rows = twins.rows(ROOT / "recipes")
    for seed, t2i in ((0, 61.0), (1, 59.0)):
        d = tmp_path / f"seed{seed}" / "cccl_synth" / "position_twins" / "cccl"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"metrics": {"test": {"t2i_r1": t2i, "i2t_r1": 70.0,
                                                                          "rsum": 500.0 + seed}}}))
    table = twins.collect(rows, [0, 1], tmp_path, measure=lambda row, seed, d: {"twin_accuracy": 70.0 + seed})
    md = twins.to_markdown(table, [0, 1], 4)
    assert "| CCCL | 61.0 | 59.0 | 60.0 | 70.0 | 71.0 | 70.5 | 500.0 | 501.0 | 500.5 |" in md
    assert "| CASC-base | — | — | — | — | — | — | — | — | — |" in md
    assert "best checkpoint (selected on val/rsum)" in md
    # the last checkpoint's measurement replaces the best's test metrics (results.json holds the best's)
    last = twins.collect(rows, [0, 1], tmp_path, measure=lambda row, seed, d: {"twin_accuracy": 60.0, "t2i_r1": 1.0,
                                                                                "i2t_r1": 2.0, "rsum": 3.0})
    md = twins.to_markdown(last, [0, 1], 8, "last")
    assert "| CCCL | 1.0 | 1.0 | 1.0 | 60.0 | 60.0 | 60.0 | 3.0 | 3.0 | 3.0 |" in md and "last checkpoint" in md


def test_twin_measurement_cache_follows_its_checkpoint(tmp_path, monkeypatch):
    import json

    import pytest

    from zoo.experiments import ensemble

    class Measured(Exception):
        pass

    def build_datamodule(configs, overrides):
        raise Measured(configs)

    monkeypatch.setattr(ensemble, "build_datamodule", build_datamodule)
    row = tmp_path / "row"
    (row / "checkpoints").mkdir(parents=True)
    assert twins.measure_twins(row, [], "last") is None  # not trained: nothing to measure
    ckpt = row / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"x")
    stamp = [ckpt.stat().st_size, ckpt.stat().st_mtime_ns]
    (row / "twins_last.json").write_text(json.dumps({"metrics": {"twin_accuracy": 55.0}, "stamp": stamp}))
    assert twins.measure_twins(row, [], "last") == {"twin_accuracy": 55.0}
    ckpt.write_bytes(b"retrained")  # another checkpoint: the cache is not used, the row is measured again
    with pytest.raises(Measured):
        twins.measure_twins(row, ["r.yaml"], "last")


def test_twin_accuracy_counts_own_image_above_its_twin_and_ties_as_half():
    import torch
    sims = torch.zeros(4, 4)  # 4 images (two twin pairs), 1 caption each
    sims[0, 0], sims[1, 0] = 0.9, 0.1  # caption 0: own image 0 above twin 1
    sims[0, 1], sims[1, 1] = 0.8, 0.2  # caption 1: own image 1 below twin 0
    sims[2, 2] = sims[3, 2] = 0.5      # caption 2: a tie
    sims[3, 3], sims[2, 3] = 0.7, 0.6  # caption 3: own image 3 above twin 2; images of other pairs do not count
    sims[0, 3] = 5.0
    assert twins.twin_accuracy(sims, caps_per_image=1) == 100 * (1 + 0 + 0.5 + 1) / 4


def test_unknown_row_is_an_error(capsys):
    assert twins.main(["--rows", "nope"]) == 2
    assert "no row nope" in capsys.readouterr().err
