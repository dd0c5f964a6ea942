"""Tests for eval.py's metrics: scores() against a confusion matrix worked out on paper, confusion_matrix()
against a brute-force loop.

    python -m pytest tests/test_eval.py -q
"""
import math

import pytest
import torch

import data
import eval as evaluation

# (ground truth, prediction) -> pixels; 32 pixels, 24 correct. Classes 3 (only predicted) and 4 (only in the
# labels) are present with IoU 0; class 9 is outside the SYNTHIA 16; every other class is absent everywhere.
CONFUSION = {(0, 0): 8, (0, 1): 2, (1, 0): 1, (1, 1): 5, (2, 2): 4, (4, 3): 3, (9, 9): 1, (13, 13): 6, (13, 0): 2}
# IoU = TP / (row + column - TP), in %:
IOU = {0: 100 * 8 / (10 + 11 - 8), 1: 100 * 5 / (6 + 7 - 5), 2: 100.0, 3: 0.0, 4: 0.0, 9: 100.0,
       13: 100 * 6 / (8 + 6 - 6)}


def paper_matrix():
    conf = torch.zeros(19, 19, dtype=torch.int64)
    for (gt, pred), n in CONFUSION.items():
        conf[gt, pred] = n
    return conf


def test_scores_match_the_paper_computation():
    result = evaluation.scores(paper_matrix(), {"mIoU16": data.SYNTHIA_16, "mIoU13": data.SYNTHIA_13})
    assert len(result["iou"]) == 19
    for c, iou in enumerate(result["iou"]):
        assert math.isnan(iou) if c not in IOU else iou == pytest.approx(IOU[c], abs=0.006), c
    assert IOU[0] == pytest.approx(61.54, abs=0.005) and IOU[1] == 62.5 and IOU[13] == 75.0
    assert result["mIoU"] == pytest.approx((61.538 + 62.5 + 100 + 0 + 0 + 100 + 75) / 7, abs=0.01)  # 57.01
    assert result["mIoU16"] == pytest.approx((61.538 + 62.5 + 100 + 0 + 0 + 75) / 6, abs=0.01)  # 49.84, no 9
    assert result["mIoU13"] == pytest.approx((61.538 + 62.5 + 100 + 75) / 4, abs=0.01)  # 74.76, no 3, 4
    assert result["pixel_acc"] == 75.0  # 24 / 32: every labelled pixel counts, also those of IoU-0 classes
    assert "mIoU16" not in evaluation.scores(paper_matrix())


def test_scores_of_an_empty_matrix_are_nan():
    result = evaluation.scores(torch.zeros(19, 19, dtype=torch.int64))
    assert all(math.isnan(v) for v in result["iou"]) and math.isnan(result["mIoU"]) and result["pixel_acc"] == 0


def test_confusion_matrix_matches_a_brute_force_count():
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 19, (500,), generator=gen)
    label[torch.rand(500, generator=gen) < 0.2] = data.IGNORE_INDEX
    pred = torch.randint(0, 19, (500,), generator=gen)
    expected = torch.zeros(19, 19, dtype=torch.int64)
    for gt, p in zip(label.tolist(), pred.tolist()):
        if gt != data.IGNORE_INDEX:
            expected[gt, p] += 1
    conf = evaluation.confusion_matrix(label, pred, 19)
    assert conf.dtype == torch.int64 and torch.equal(conf, expected)
    assert conf.sum() == (label != data.IGNORE_INDEX).sum() < 450  # the ignored pixels are dropped
