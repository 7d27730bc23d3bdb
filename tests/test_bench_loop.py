"""``minideeplab bench --loop``: the training loop end to end, ours against PyTorch's, on a tiny config."""
import json

import pytest

from minideeplab import bench
from minideeplab.bench_loop import _images_per_s, loop_config


def test_images_per_s_counts_from_the_end_of_the_warmup_steps():
    stamps = [(0.0, 0.0), (5.0, 9.0), (6.0, 10.0), (7.5, 12.0), (8.0, 15.0)]   # (wall, CPU) at step ends
    result = _images_per_s(stamps, batch=4, warmup=2)                      # the first two steps are warm-up
    assert result == {"images_per_s": 4 * 3 / 3.0, "step_s": 1.0, "steps_timed": 3, "steps_s": [1.0, 1.5, 0.5],
                      "cpu_s_per_image": 6 / 12}


def test_loop_config_is_the_benchmarks_run():
    spec = {"output_stride": 16, "size": 256, "batch": 2, "device": "cpu", "loop_steps": 50}
    cfg = loop_config(spec)
    assert (cfg.model, cfg.output_stride, cfg.image_size, cfg.batch_size) == ("densenet121", 16, 256, 2)
    assert (cfg.train_size, cfg.epochs, cfg.optimizer, cfg.scheduler, cfg.loss) == (100, 1, "adamw", "poly", "bce")


def test_quick_loop_bench_writes_both_sides(tmp_path, capsys):
    pytest.importorskip("torch")
    assert bench.main(["--loop", "--quick", "--loop-steps", "4", "--loop-warmup", "2", "--threads", "1",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_loop_cpu_quick.json").read_text())
    (row,) = report["rows"]
    assert row["ours"]["steps_timed"] == row["torch"]["steps_timed"] == 2
    assert row["ours"]["images_per_s"] > 0 and row["torch"]["images_per_s"] > 0 and row["ours"]["data_images_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["ours"]["images_per_s"] / row["torch"]["images_per_s"])
    assert row["ours"]["captured"] is False                 # the CPU steps eagerly
    md = (tmp_path / "bench_loop_cpu_quick.md").read_text()
    assert "| OS | ours (img/s) | PyTorch (img/s) | speed-up (ours / PyTorch)" in md and "| 16 |" in md
    assert row["ours"]["cpu_s_per_image"] > 0 and row["torch"]["cpu_s_per_image"] > 0
    assert "OS 16 loop" in capsys.readouterr().out
