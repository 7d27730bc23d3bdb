"""ConfusionMeter and format_metrics against cases counted by hand."""
import numpy as np
import pytest

from minideeplab.metrics import ConfusionMeter, format_metrics

# A 3x3 mask and probabilities; at threshold 0.5 the prediction is
#   target      pred (p > 0.5)
#   1 1 0       1 0 0          tp: (0,0) (1,1) (2,0)         = 3
#   0 1 1       1 1 0          fp: (1,0)                     = 1
#   1 0 0       1 0 0          fn: (0,1) (1,2)               = 2
#                              tn: (0,2) (2,1) (2,2)         = 3
TARGET = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=np.float32)
PROBS = np.array([[0.9, 0.4, 0.1], [0.6, 0.8, 0.2], [0.7, 0.3, 0.0]], dtype=np.float32)


def test_hand_counted_case(xp):
    meter = ConfusionMeter(threshold=0.5)
    meter.update(xp.asarray(PROBS[None, None]), xp.asarray(TARGET[None, None]))
    m = meter.compute()
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 2, 3)
    assert m["iou"] == pytest.approx(3 / 6)               # tp / (tp + fp + fn)
    assert m["dice"] == pytest.approx(6 / 9)              # 2tp / (2tp + fp + fn)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert all(isinstance(m[k], int) for k in ("tp", "fp", "fn", "tn"))
    assert all(isinstance(m[k], float) for k in ("iou", "dice", "precision", "recall", "accuracy"))


def test_threshold_changes_counts(xp):
    # at 0.35: 0.4 becomes a hit (tp 4, fn 1); 0.6 stays fp; nothing else crosses -> tp 4, fp 1, fn 1, tn 3
    meter = ConfusionMeter(threshold=0.35)
    meter.update(xp.asarray(PROBS), xp.asarray(TARGET))
    m = meter.compute()
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 1, 1, 3)
    assert m["iou"] == pytest.approx(4 / 6) and m["dice"] == pytest.approx(8 / 10)


def test_accumulates_over_batches_and_resets(xp):
    meter = ConfusionMeter()
    meter.update(xp.asarray(PROBS), xp.asarray(TARGET))
    # second batch: all predicted foreground, mask half foreground -> tp 2, fp 2
    meter.update(xp.full((1, 4), 0.99), xp.asarray([[1.0, 0.0, 1.0, 0.0]]))
    m = meter.compute()
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (5, 3, 2, 3)
    assert m["iou"] == pytest.approx(5 / 10) and m["accuracy"] == pytest.approx(8 / 13)
    meter.reset()
    with pytest.raises(RuntimeError, match="no pixels counted yet"):
        meter.compute()


def test_empty_conventions(xp):
    both_empty = ConfusionMeter()
    both_empty.update(xp.zeros((2, 1, 3, 3)), xp.zeros((2, 1, 3, 3)))
    m = both_empty.compute()
    assert (m["iou"], m["dice"], m["precision"], m["recall"], m["accuracy"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert m["tn"] == 18

    missed = ConfusionMeter()                      # nothing predicted, 2 foreground pixels
    missed.update(xp.zeros((1, 4)), xp.asarray([[1.0, 1.0, 0.0, 0.0]]))
    m = missed.compute()
    assert (m["iou"], m["dice"], m["precision"], m["recall"]) == (0.0, 0.0, 1.0, 0.0)
    assert m["accuracy"] == 0.5

    hallucinated = ConfusionMeter()                # 1 pixel predicted on an empty mask
    hallucinated.update(xp.asarray([[0.9, 0.1, 0.1, 0.1]]), xp.zeros((1, 4)))
    m = hallucinated.compute()
    assert (m["iou"], m["dice"], m["precision"], m["recall"], m["accuracy"]) == (0.0, 0.0, 0.0, 1.0, 0.75)


def test_threshold_is_strict_and_boolean_predictions(xp):
    meter = ConfusionMeter(threshold=0.5)                 # like model.predict: probs > threshold
    meter.update(xp.asarray([0.50001, 0.5, 0.3]), xp.asarray([1, 1, 1], dtype=np.uint8))
    assert (meter.tp, meter.fn) == (1, 2)
    pred = ConfusionMeter()
    pred.update(xp.asarray([True, False, True]), xp.asarray([True, True, False]))
    assert (pred.tp, pred.fp, pred.fn, pred.tn) == (1, 1, 1, 0)


def test_mixed_backends(xp):
    meter = ConfusionMeter()
    meter.update(xp.asarray(PROBS), TARGET)        # target on the host, probs on xp
    assert (meter.tp, meter.fp, meter.fn, meter.tn) == (3, 1, 2, 3)


def test_bad_inputs(xp):
    meter = ConfusionMeter()
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(3, 2\)"):
        meter.update(xp.zeros((2, 3)), xp.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\], got values in \[-2, 3\] \(logits\?"):
        meter.update(xp.asarray([-2.0, 3.0]), xp.asarray([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"binary mask with values in \{0, 1\}"):
        meter.update(xp.asarray([0.2, 0.7]), xp.asarray([0.0, 0.5]))
    with pytest.raises(TypeError, match="float or boolean array, got int64"):
        meter.update(xp.asarray([0, 1], dtype=np.int64), xp.asarray([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 1.5"):
        ConfusionMeter(threshold=1.5)
    assert meter.total == 0                        # failed updates count nothing


def test_format_metrics():
    text = format_metrics({"tp": 3, "loss": 0.123456, "iou": 0.5, "dice": 2 / 3, "fp": 1}, title="validation")
    lines = text.splitlines()
    assert lines[0] == "validation"
    assert lines[1].split() == ["metric", "|", "value"]
    assert set(lines[2]) == {"-"}
    rows = [line.split() for line in lines[3:]]
    assert rows == [["iou", "|", "0.5000"], ["dice", "|", "0.6667"], ["loss", "|", "0.1235"],
                    ["tp", "|", "3"], ["fp", "|", "1"]]
    assert len({len(line) for line in lines[1:]}) == 1       # aligned columns
    assert format_metrics({"iou": np.float64(0.25)}).splitlines()[-1].split() == ["iou", "|", "0.2500"]
