"""``minideeplab experiment``: every experiment runs end to end in a tiny configuration (the pipeline, never the
effect: effects are reported by the experiments, not asserted here), and the statistics of its report."""
import csv

import numpy as np
import pytest

from minideeplab import cli
from minideeplab.experiment_report import committed_results, read_results, summarize
from minideeplab.experiments import EXPERIMENTS, QUICK, ExperimentConfig, resolve_variants
from minideeplab.train import Trainer


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_runs_end_to_end(name, tmp_path, capsys):
    out = tmp_path / name
    assert cli.main(["experiment", name, "--quick", "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    assert f"wrote {out}/results.csv" in capsys.readouterr().out
    for f in ("results.csv", "summary.md", "metrics.png", "trimap.png", "predictions.png"):
        assert (out / f).stat().st_size > 0, f
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]      # atomic writes left nothing
    variants, baseline = resolve_variants(EXPERIMENTS[name], QUICK)
    rows = read_results(out / "results.csv")
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted((v.name, s) for v in variants for s in (0, 1))
    for r in rows:
        assert 0 <= r["iou"] <= 1 and 0 <= r["boundary_iou"] <= 1 and r["train_s_per_step"] > 0
        assert r["tp"] + r["fp"] + r["fn"] + r["tn"] == QUICK["val_size"] * QUICK["image_size"] ** 2
        assert r["step_peak_mib"] > 0
    text = (out / "summary.md").read_text()
    assert f"Paired differences from the baseline ({baseline})" in text
    assert "--quick --seeds 2" in text
    assert all(v.name in text for v in variants)
    assert "- load: 1-minute load average" in text and "OMP_NUM_THREADS=" in text    # timings need the load


def test_variants_that_share_a_model_are_trained_once(tmp_path, monkeypatch):
    fits = []
    original = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: fits.append(self.cfg.output_stride) or original(self))
    assert cli.main(["experiment", "test-time", "--quick", "--seeds", "1", "--out", str(tmp_path), "--quiet"]) == 0
    assert fits == [16]                      # four ways to evaluate, one training
    rows = read_results(tmp_path / "results.csv")
    assert len(rows) == 4 and all(r["seconds_per_image"] > 0 for r in rows)     # each evaluation was timed


def test_trainer_builds_the_ablated_model():
    cfg = ExperimentConfig(model="small", image_size=32, train_size=4, val_size=2, batch_size=2, epochs=1,
                           rates=(), image_pooling=False)
    aspp = Trainer(cfg, out_dir=None, progress=False, figures=False).model.head.aspp
    assert aspp.pooling is None and len(aspp.branches) == 1 and aspp.rates == ()
    aspp = Trainer(ExperimentConfig(model="small", image_size=32, train_size=4, val_size=2, batch_size=2,
                                    rates=(1, 2, 3)), out_dir=None, progress=False, figures=False).model.head.aspp
    assert aspp.pooling is not None and aspp.rates == (1, 2, 3)


def test_summary_statistics_by_hand(tmp_path):
    rows = [{"variant": v, "seed": s, "iou": iou, "boundary_iou": b}
            for v, s, iou, b in [("base", 0, 0.50, 0.20), ("base", 1, 0.60, 0.30), ("base", 2, 0.40, 0.10),
                                 ("new", 0, 0.55, 0.20), ("new", 1, 0.62, 0.25), ("new", 2, 0.47, 0.15)]]
    st = summarize(rows, ["base", "new"], "base")["new"]["iou"]
    assert st["mean"] == pytest.approx((0.55 + 0.62 + 0.47) / 3)
    assert st["std"] == pytest.approx(np.std([0.55, 0.62, 0.47], ddof=1))
    assert st["diffs"] == pytest.approx([0.05, 0.02, 0.07])
    assert st["diff_mean"] == pytest.approx(0.14 / 3) and st["diff_std"] == pytest.approx(0.025166, abs=1e-6)
    assert st["wins"] == 3
    b = summarize(rows, ["base", "new"], "base")["new"]["boundary_iou"]
    assert b["diffs"] == pytest.approx([0.0, -0.05, 0.05]) and b["wins"] == 1
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "seed", "iou", "boundary_iou"])
        w.writeheader()
        w.writerows(rows)
    assert read_results(path) == rows


def test_bad_options_fail_cleanly(capsys, tmp_path):
    assert cli.main(["experiment", "aspp", "--seeds", "0", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "minideeplab experiment: error: --seeds must be >= 1, got 0"
    assert cli.main(["experiment", "no-such-experiment"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minideeplab experiment: error: argument name: invalid choice") and "\n" not in err
    assert cli.main(["experiment", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_committed_results_are_found_and_complete(name, tmp_path):
    """docs/experiments/<name>/ of this checkout, from the notebooks' folder and from anywhere else (beside the
    package): what notebooks 02, 04 and 06 read."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    folder = committed_results(name, start=root / "notebooks")
    assert folder == root / "docs" / "experiments" / name
    assert committed_results(name, start=tmp_path) == folder
    for f in ("results.csv", "summary.md", "metrics.png", "trimap.png", "predictions.png"):
        assert (folder / f).stat().st_size > 0, f
    variants, _ = resolve_variants(EXPERIMENTS[name], {"image_size": 96})
    rows = read_results(folder / "results.csv")
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted((v.name, s) for v in variants for s in (0, 1, 2))


def test_committed_results_missing_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="minideeplab experiment no-such"):
        committed_results("no-such", start=tmp_path)
