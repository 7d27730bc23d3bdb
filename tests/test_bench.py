"""Smoke test of ``minideeplab bench`` in quick mode: the output structure, never the timings."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from minideeplab import bench
from minideeplab.backend import cuda_available
from minideeplab.models import DeepLabConfig, build_deeplab, set_fused
from minideeplab.profiler import FUSED, CountingArray, TypeProfiler, gemm_reference, operations_counted

torch_installed = importlib.util.find_spec("torch") is not None


def test_quick_bench_writes_json_and_markdown(tmp_path):
    rc = bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1", "--rounds", "2",
                     "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "bench_cpu_quick.json").read_text())
    md = (tmp_path / "bench_cpu_quick.md").read_text()
    assert [(r["output_stride"], r["mode"]) for r in report["rows"]] == [(16, "eval"), (16, "train")]
    for r in report["rows"]:
        assert len(r["ours"]["times_s"]) == 2 and r["ours_s"] > 0      # one timed run in each of 2 rounds
        assert r["ours_peak_rss_mib"] > 10
        if torch_installed:
            (o1, o2), (t1, t2) = r["ours"]["times_s"], r["torch"]["times_s"]
            assert r["round_ratios"] == pytest.approx([o1 / t1, o2 / t2])
            assert r["ratio"] == pytest.approx((o1 / t1 + o2 / t2) / 2)   # the median of two ratios
        else:
            assert r["torch_s"] is None and r["ratio"] is None and r["round_ratios"] == []
    assert "x 2 alternating rounds" in md
    prof = report["profile"]
    cats = {p["category"] for p in prof["profile"]}
    assert {"conv forward", "conv backward", "batch norm", "relu", "pooling", "optimizer", "loss"} <= cats
    assert sum(p["share"] for p in prof["profile"]) == pytest.approx(1.0, abs=1e-6)
    assert set(prof["gemm"]) <= {"pointwise", "kn2row", "taps", "im2col"} and "im2col" in prof["gemm"]
    assert "| 16 | train |" in md and "efficiency" in md
    assert report["machine"]["fuse_failures"] == {} and "did not fuse" not in md       # NumPy fuses nothing
    report["machine"]["fuse_failures"] = {"minideeplab.nn.norm._affine": "TypeError: no"}
    assert "CuPy did not fuse, so these ran operation by operation: minideeplab.nn.norm._affine (TypeError: no)" \
        in bench.markdown(report)


@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a GPU")
def test_quick_bench_on_cuda(tmp_path):
    """The --device cuda path end to end (CuPy vs PyTorch CUDA where torch has CUDA), tiny config."""
    rc = bench.main(["--quick", "--device", "cuda", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_cuda_quick.json").read_text())
    assert [r["ours_s"] > 0 for r in report["rows"]] == [True, True], report["rows"]
    assert "gemm" in report["profile"], report["profile"]
    assert report["machine"]["fuse_failures"] == {}        # CuPy fused every backend.fuse function
    assert rc == 0, report["rows"]          # a CPU-only torch build is reported as skipped, not as an error


def test_forced_conv_algorithm_keeps_the_output_and_is_reported(tmp_path):
    model = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0)).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    ref = model(x)
    n = bench.force_conv_algorithm(model, "im2col")
    convs = [m for m in model.modules() if type(m).__name__ == "Conv2d"]
    assert n == sum(m.kernel_size != (1, 1) and m.stride == (1, 1) for m in convs) > 0
    out = model(x)
    assert {m.path for m in convs if m.algorithm == "im2col"} == {"im2col"}
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    rc = bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-torch", "--no-profile",
                     "--conv-algorithm", "im2col", "--out", str(tmp_path)])
    assert rc == 0
    assert "convs forced to 'im2col'" in (tmp_path / "bench_cpu_quick.md").read_text()
    # gather applies to the strided stem as well
    assert bench.force_conv_algorithm(model, "gather") == n + 1
    out = model(x)
    assert {m.path for m in convs if m.kernel_size != (1, 1)} == {"gather"}
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_bench_rejects_unknown_output_stride(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--os", "4"])


def test_profiler_charges_exclusive_time_and_restores_the_model():
    model = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0)).eval()   # deterministic
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    ref = model(x)
    prof = TypeProfiler(model).attach()
    with prof.region("whole step"):
        out = model(x)
        model.backward(np.ones_like(out))
    prof.detach()
    np.testing.assert_array_equal(out, ref)                      # timing hooks do not change the math
    assert not any(set(m.__dict__) & {"forward", "backward", "backward_terms"} for m in model.modules())
    heads = [m.fused_head for m in model.modules() if hasattr(m, "fused_head")]
    assert heads and not any(set(h.__dict__) & {"forward", "grad_at_norm_output", "norm_sums"} for h in heads)
    assert prof.totals[FUSED] > 0                                 # the fused heads are a category of their own
    nested = sum(t for c, t in prof.totals.items() if c != "whole step")
    whole = prof.totals["whole step"]
    assert nested > 0 and whole >= 0                              # exclusive: the outer region excludes them
    rows = prof.report(total=nested + whole)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    n_convs = sum(1 for m in model.modules() if type(m).__name__ == "Conv2d")
    assert len(prof.per_conv) == n_convs - len(heads)             # a fused head's conv is not timed on its own
    set_fused(model, False)                                       # ... unless the heads run layer by layer
    prof.attach()
    model(x)
    prof.detach()
    convs = [c for c, _, _ in prof.per_conv.values()]
    ref_times = gemm_reference(convs, repeats=1)
    assert len(convs) == n_convs
    assert all(t > 0 for t in ref_times.values())


def test_counting_array_counts_each_operation_once():
    a = np.arange(6.0).reshape(2, 3).view(CountingArray)
    CountingArray.counts.clear()
    b = a + 1                                  # add
    total = b.sum()                            # add.reduce
    a[0] = 5.0                                 # setitem
    cols = np.einsum("ij->j", a)               # einsum
    d = (a @ b.T).copy()                       # matmul, copy
    v = a.T.reshape(-1)                        # views and reshapes: no kernel, not counted
    assert dict(CountingArray.counts) == {"add": 1, "add.reduce": 1, "setitem": 1, "einsum": 1, "matmul": 1, "copy": 1}
    assert operations_counted() == 6
    assert type(b) is CountingArray and type(d) is CountingArray and type(v) is CountingArray
    np.testing.assert_array_equal(cols, [5.0 + 3.0, 5.0 + 4.0, 5.0 + 5.0])
    CountingArray.syncs.clear()
    assert float(total) == sum(range(1, 7))                       # a host read: one sync each
    assert bool((a > 0).all()) and (a.max() > 4).item()
    assert dict(CountingArray.syncs) == {"float": 1, "bool": 1, "item": 1}


def test_counting_array_counts_an_array_function_once_and_views_not_at_all():
    """np.clip runs the clip ufunc inside, zeros_like runs copyto: one operation each, as on a GPU; split, swapaxes
    and broadcast_to make views: none."""
    a = np.arange(12.0).reshape(2, 6).view(CountingArray)
    CountingArray.counts.clear()
    c = np.clip(a, 2.0, 8.0)
    z = np.zeros_like(a)
    parts = np.split(a, 2, axis=1) + [np.swapaxes(a, 0, 1), np.broadcast_to(a[:1], (3, 6))]
    assert dict(CountingArray.counts) == {"clip": 1, "zeros_like": 1}
    assert float(c.max()) == 8.0 and not np.any(z) and all(np.shares_memory(p, a) for p in parts)


def _load_script(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_count_ops_counts_whole_buffer_optimizer_steps():
    count_ops = _load_script("count_ops")
    result = count_ops.count_step(output_stride=16, size=32)
    # independent of the 382 parameters: SGD momentum 0.9 is buf *= m, buf += g, lr * buf, p -= (4 operations);
    # AdamW adds p *= 1 - lr wd, and m, v, the denominator and the update: 1 + 3 + 4 + 3 + 3 = 14
    assert result["params"] == 382
    assert result["train_sgd"]["optimizer"] == 4 and result["train_adamw"]["optimizer"] == 14
    sgd = result["train_sgd"]
    assert sgd["forward"] > 1000 and sgd["backward"] > 1000 and result["eval_forward"] > 1000
    assert sum(r["ops"] for r in result["by_type"]) == pytest.approx(sum(sgd.values()), abs=len(result["by_type"]))
    assert {r["category"] for r in result["by_type"]} >= {"batch norm", "conv forward", "conv backward", "optimizer"}
    assert "| train, AdamW |" in count_ops.markdown(result)
    # host syncs: each fused BN-ReLU-1x1 head checks its scales once in forward (relu_of_affine: all positive?); a
    # dense layer's scaled backward needs no read of its own after that check said yes (DenseBlock's
    # backward_terms); densenet121: 58 dense layers, 3 transitions; the loss checks that the target is 0/1 once
    train = 61 + 1
    assert result["syncs"] == {"eval_forward": 61, "train_sgd": train, "train_adamw": train}


def test_count_ops_as_captured_in_a_cuda_graph_reads_nothing_on_the_host():
    """While a step is captured (``CountingArray.capturing``), no code reads an array value: the 61 fused heads
    skip their check of the scales (one reduction each) and take their general path instead (one fused function
    for its bounds, clip instead of max; in training ReLU's mask then compares with both bounds: two more), the
    loss skips its target check; the optimizer and the rest run as they do eagerly."""
    count_ops = _load_script("count_ops")
    eager = count_ops.count_step(output_stride=16, size=32)
    captured = count_ops.count_step(output_stride=16, size=32, capturing=True)
    assert captured["syncs"] == {"eval_forward": 0, "train_sgd": 0, "train_adamw": 0}
    assert captured["train_sgd"]["optimizer"] == 4 and captured["train_adamw"]["optimizer"] == 14
    assert captured["eval_forward"] == eager["eval_forward"] - 61 + 61
    assert captured["train_sgd"]["forward"] == eager["train_sgd"]["forward"] - 61 + 61 + 2 * 61
    assert captured["train_sgd"]["backward"] == eager["train_sgd"]["backward"]
    assert captured["train_sgd"]["loss"] < eager["train_sgd"]["loss"]
    assert "captured (CUDA graph)" in count_ops.markdown(eager, captured)


def test_conv_flops_matches_hand_count():
    # 3x3, 128 -> 32 at 64x64, batch 2, padding 1: 2 * 2 * 32 * 128 * 9 * 64 * 64 FLOPs
    assert bench.conv_flops(2, 128, 32, 3, 1, 1, 1, 64) == 2 * 2 * 32 * 128 * 9 * 4096
    # 7x7 stride 2 padding 3 at 256: output 128x128
    assert bench.conv_flops(2, 3, 64, 7, 2, 3, 1, 256) == 2 * 2 * 64 * 3 * 49 * 128 * 128


def test_merge_rounds_joins_times_and_keeps_the_worst_peak():
    a = {"times_s": [1.0, 2.0], "cpu_s": [1.5, 2.5], "peak_rss_mib": 100.0, "torch": "2.13"}
    b = {"times_s": [3.0], "cpu_s": [3.5], "peak_rss_mib": 120.0, "torch": "2.13"}
    merged = bench.merge_rounds([a, b])
    assert merged == {"times_s": [1.0, 2.0, 3.0], "cpu_s": [1.5, 2.5, 3.5], "peak_rss_mib": 120.0, "torch": "2.13"}
    assert bench.merge_rounds([a]) is a
    assert bench.merge_rounds([{}, {}]) == {}            # torch not installed: no PyTorch results in any round
    failed = {"error": "phase ours train timed out after 1 s"}
    assert bench.merge_rounds([a, failed]) is failed


def test_bench_rejects_zero_rounds(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_bench_cuda_graph_needs_the_cuda_device(capsys):
    assert bench.main(["--quick", "--cuda-graph", "--no-torch"]) == 1
    assert "--cuda-graph needs --device cuda" in capsys.readouterr().err


def test_ab_compare_pairs_the_working_tree_with_a_commit(capsys):
    """The in-process A/B imports the committed package beside the working tree's and reports paired ratios."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    ab = _load_script("ab_compare")
    assert ab.main(["--base", "HEAD", "--small", "--size", "32", "--pairs", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "new / HEAD = " in out and "median of 2 paired ratios" in out
    assert not any(name.startswith("minideeplab_base") for name in sys.modules)     # cleaned up


def test_graphed_phase_draws_fresh_dropout_masks_before_every_replay(monkeypatch):
    """``bench --cuda-graph``'s plumbing, on the CPU: a stand-in for ``backend.cuda_graph`` that runs ``prepare`` and
    the step where the real one would replay. The step runs eagerly once, then every replay is preceded by a fresh
    draw of each dropout mask into the same array, and the phase is timed as usual."""
    from minideeplab import backend
    from minideeplab.nn import Dropout
    calls = []

    def stand_in(step, prepare=None, warmup=2):
        calls.append("capture")

        def replay():
            prepare()
            step()
        return replay
    monkeypatch.setattr(backend, "cuda_graph", stand_in)
    drawn = []
    original = Dropout.draw_ahead

    def recording(self):
        original(self)
        drawn.append((id(self.ahead), self.ahead.copy()))
    monkeypatch.setattr(Dropout, "draw_ahead", recording)
    spec = {"device": "cpu", "batch": 2, "size": 32, "repeats": 2, "warmup": 0, "threads": 1, "conv_algorithm": "auto",
            "cuda_graph": True, "config": DeepLabConfig.small().to_dict(), "mode": "train", "framework": "ours"}
    result = bench.run_phase(spec)
    assert calls == ["capture"] and len(result["times_s"]) == 2
    assert len(drawn) == 3                               # _measure's untimed step and the 2 timed ones
    assert len({key for key, _ in drawn}) == 1           # one array, overwritten in place
    assert not np.array_equal(drawn[0][1], drawn[1][1])  # a fresh mask each time

