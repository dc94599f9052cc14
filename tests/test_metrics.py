import json

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from torch.utils.data import DataLoader

from conftest import TensorSplit, score
from kvseg.evaluation.evaluate import tune_threshold
from kvseg.evaluation.metrics import scores_from_counts

BIG = 30.0  # a logit far from the threshold


def _batch(prediction: list[list[int]], target: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor(prediction, dtype=torch.float32)[None, None]
    t = torch.tensor(target, dtype=torch.float32)[None, None]
    return (p * 2 - 1) * BIG, t


def test_hand_computed_case() -> None:
    # 2x3 image: tp=2, fp=1, fn=1, tn=2
    logits, masks = _batch([[1, 1, 1], [0, 0, 0]], [[1, 1, 0], [1, 0, 0]])
    result = score(logits, masks).to_json()
    assert result["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 2}
    assert result["dataset"]["iou"] == pytest.approx(2 / 4)
    assert result["dataset"]["dice"] == pytest.approx(4 / 6)
    assert result["dataset"]["precision"] == pytest.approx(2 / 3)
    assert result["dataset"]["recall"] == pytest.approx(2 / 3)
    assert result["dataset"]["accuracy"] == pytest.approx(4 / 6)
    assert result["dataset"]["specificity"] == pytest.approx(2 / 3)
    assert result["per_image"] == result["dataset"]
    # two pixels wrong by a saturated logit each: BCE is 2 * BIG spread over 6 pixels
    assert result["loss"] == pytest.approx(2 / 6 * BIG, rel=1e-4) and result["loss_name"] == "bce"
    row = result["images"][0]
    assert row["true_fraction"] == pytest.approx(3 / 6) and row["predicted_fraction"] == pytest.approx(3 / 6)


def test_empty_mask_and_empty_prediction() -> None:
    scores = scores_from_counts(np.array([0, 0]), np.array([0, 3]), np.array([0, 0]), np.array([16, 13]))
    assert scores["iou"].tolist() == [1.0, 0.0]  # both empty: perfect; false positives only: zero
    assert scores["dice"].tolist() == [1.0, 0.0]
    assert scores["precision"].tolist() == [1.0, 0.0]
    assert scores["recall"].tolist() == [1.0, 0.0]
    assert scores["specificity"][0] == 1.0


def test_per_image_mean_differs_from_dataset_level() -> None:
    first = _batch([[1, 1], [1, 1]], [[1, 1], [1, 1]])  # IoU 1 on 4 pixels
    second = _batch([[1, 0], [0, 0]], [[0, 1], [0, 0]])  # IoU 0
    result = score(torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]), batch_size=1)
    assert result.per_image.iou == pytest.approx(0.5)
    assert result.dataset.iou == pytest.approx(4 / 6)
    assert result.num_images == 2 and [row.iou for row in result.images] == [1.0, 0.0]


def test_agrees_with_scikit_learn_and_batching_does_not_matter() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(10, 1, 24, 24, generator=generator) > 0.7).float()
    logits = torch.randn(10, 1, 24, 24, generator=generator) * 2.5 + (masks * 2 - 1) * 1.5
    result = score(logits, masks, batch_size=3).to_json()
    assert result == score(logits, masks).to_json()
    y, s = masks.flatten().numpy(), logits.flatten().numpy()
    predicted = s > 0
    assert result["dataset"]["iou"] == pytest.approx(jaccard_score(y, predicted))
    assert result["dataset"]["dice"] == pytest.approx(f1_score(y, predicted))
    assert result["dataset"]["precision"] == pytest.approx(precision_score(y, predicted))
    assert result["dataset"]["recall"] == pytest.approx(recall_score(y, predicted))
    assert result["dataset"]["accuracy"] == pytest.approx(accuracy_score(y, predicted))
    assert abs(result["average_precision"] - average_precision_score(y, s)) < 1e-3
    assert abs(result["roc_auc"] - roc_auc_score(y, s)) < 1e-3
    per_image_iou = [jaccard_score(masks[i].flatten(), logits[i].flatten() > 0) for i in range(10)]
    assert result["per_image"]["iou"] == pytest.approx(np.mean(per_image_iou))
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks).item()
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_saturated_logits_stay_within_tolerance() -> None:
    generator = torch.Generator().manual_seed(1)
    masks = (torch.rand(4, 1, 32, 32, generator=generator) > 0.8).float()
    logits = torch.randn(4, 1, 32, 32, generator=generator) * 12 + (masks * 2 - 1) * 6
    result = score(logits, masks).to_json()
    y, s = masks.flatten().numpy(), logits.flatten().numpy()
    assert abs(result["average_precision"] - average_precision_score(y, s)) < 1e-3
    assert abs(result["roc_auc"] - roc_auc_score(y, s)) < 1e-3


def test_threshold_is_applied_on_probabilities() -> None:
    logits = torch.tensor([[[[0.5, 1.5]]]])  # probabilities 0.62, 0.82
    masks = torch.tensor([[[[1.0, 1.0]]]])
    assert score(logits, masks, threshold=0.7).confusion_matrix.tp == 1
    assert score(logits, masks, threshold=0.5).confusion_matrix.tp == 2


def test_no_positive_pixel_leaves_ranking_scores_undefined_with_a_reason() -> None:
    result = score(torch.full((1, 1, 4, 4), -BIG), torch.zeros(1, 1, 4, 4))
    assert result.average_precision is None and result.roc_auc is None
    assert "no foreground pixel" in result.undefined["average_precision"]
    assert result.per_image.iou == 1.0
    assert json.loads(json.dumps(result.to_json(), allow_nan=False))["roc_auc"] is None  # valid JSON, no NaN


def test_threshold_tuning_maximises_per_image_dice() -> None:
    masks = torch.zeros(4, 1, 6, 6)
    masks[:, :, :3] = 1
    probability = torch.where(masks.bool(), 0.3, 0.1)  # every threshold between 0.1 and 0.3 separates perfectly
    logits = torch.log(probability / (1 - probability))
    grid = [0.05, 0.15, 0.2, 0.25, 0.5, 0.9]
    choice = tune_threshold(lambda x: x, DataLoader(TensorSplit(logits, masks), batch_size=3), grid)
    assert choice.value == 0.25  # the best Dice, and of the ties the nearest to 0.5
    assert choice.dice == pytest.approx([2 * 18 / (2 * 18 + 18), 1.0, 1.0, 1.0, 0.0, 0.0])


def test_the_bootstrap_interval_holds_the_mean_and_narrows_with_more_images() -> None:
    from kvseg.evaluation.uncertainty import bootstrap_interval, within

    rng = np.random.default_rng(0)
    few, many = rng.uniform(0.5, 1.0, 36), rng.uniform(0.5, 1.0, 360)
    narrow, wide = bootstrap_interval(many), bootstrap_interval(few)
    assert wide[0] < few.mean() < wide[1] and narrow[0] < many.mean() < narrow[1]
    assert (narrow[1] - narrow[0]) < 0.5 * (wide[1] - wide[0])  # about 1 / sqrt(10) as wide
    assert bootstrap_interval(few) == wide and bootstrap_interval([0.7]) is None  # seeded; undefined for one image
    assert within((0.7, 0.8), {3: 0.69, 5: 0.75, 9: 0.8, 11: None}) == [5, 9]


def test_evaluation_reports_the_interval_of_per_image_dice() -> None:
    masks = torch.zeros(8, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1
    logits = torch.where(masks > 0, 5.0, -5.0)
    logits[:3, :, 4:8] = -5.0  # three images lose half their object
    result = score(logits, masks)
    low, high = result.dice_ci95
    assert low < result.per_image.dice < high and low >= 2 / 3 - 1e-9 and high <= 1.0
