"""MapFidelity against plain numpy on the whole data at once, fed in uneven batches; its edge-case
conventions; output_kind; dense_loss's values and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitslim.measure import fidelity
from vitslim.measure.fidelity import MapFidelity, dense_loss, output_kind

UNEVEN_BATCHES = (1, 5, 3, 4)  # 13 images


def brute_force(student: np.ndarray, teacher: np.ndarray, threshold: float) -> dict:
    """Every metric per its definition, in float64, one image at a time."""
    student = student.reshape(len(student), -1).astype(np.float64)
    teacher = teacher.reshape(len(teacher), -1).astype(np.float64)
    error = student - teacher
    pearsons, ious, cosines, deviation = [], [], [], 0.0
    for s, t in zip(student, teacher):
        if t.min() == t.max():
            pearsons.append(1.0 if np.array_equal(s, t) else 0.0)
        elif s.min() == s.max():
            pearsons.append(0.0)
        else:
            pearsons.append(float(np.corrcoef(s, t)[0, 1]))
            deviation += float(((t - t.mean()) ** 2).sum())
        above_s, above_t = s > threshold, t > threshold
        union = (above_s | above_t).sum()
        ious.append(1.0 if union == 0 else (above_s & above_t).sum() / union)
        norms = np.linalg.norm(s) * np.linalg.norm(t)
        cosines.append(1.0 if np.array_equal(s, t) else (0.0 if norms == 0 else float(s @ t / norms)))
    return {"images": len(student), "threshold": threshold, "mae": np.abs(error).mean(),
            "rmse": math.sqrt((error ** 2).mean()), "pearson": np.mean(pearsons), "iou": np.mean(ious),
            "cosine": np.mean(cosines), "relative_mse": (error ** 2).sum() / deviation,
            "constant_teacher": sum(t.min() == t.max() for t in teacher)}


def streamed(student: torch.Tensor, teacher: torch.Tensor, batches=UNEVEN_BATCHES, threshold: float = 0.8) -> dict:
    score, start = MapFidelity(threshold), 0
    for size in batches:
        score.update(student[start:start + size], teacher[start:start + size])
        start += size
    assert start == len(student)
    return score.result()


def assert_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def saliency_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """13 teacher maps (13, 1, 6, 5) in (0, 1) and a noisy student, with one image of each edge
    case mixed in: a constant teacher map, one the student copies exactly, one nobody finds
    salient."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.sigmoid(2 * torch.randn(13, 1, 6, 5, generator=generator))
    student = (teacher + 0.15 * torch.randn(teacher.shape, generator=generator)).clamp(0, 1)
    teacher[2] = 0.25  # constant, and the student is not
    student[7] = teacher[7]  # identical
    teacher[10], student[10] = teacher[10] * 0.5, student[10] * 0.5  # nothing above 0.8 on either side
    return student, teacher


def test_maps_streamed_in_uneven_batches_equal_the_brute_force_and_one_batch():
    student, teacher = saliency_pair()
    expected = brute_force(student.numpy(), teacher.numpy(), 0.8)
    assert expected["constant_teacher"] == 1 and 0 < expected["iou"] < 1
    assert_close(streamed(student, teacher), expected)
    assert_close(streamed(student, teacher, batches=(13,)), expected)


def test_errors_average_over_elements_and_scores_over_images_when_sizes_differ():
    small_teacher, large_teacher = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 4)
    large_teacher[0, 0, 0, 0] = 1.0
    score = MapFidelity()
    score.update(torch.ones_like(small_teacher), small_teacher)  # error 1 on 4 elements, cosine 0
    score.update(large_teacher, large_teacher)  # no error on 16 elements, cosine 1
    result = score.result()
    assert result["mae"] == pytest.approx(4 / 20) and result["rmse"] == pytest.approx(math.sqrt(4 / 20))
    assert result["cosine"] == pytest.approx(0.5)


def test_token_features_streamed_equal_the_brute_force():
    generator = torch.Generator().manual_seed(1)
    teacher = 3 * torch.randn(13, 7, 4, generator=generator) + 1
    student = 0.8 * teacher + torch.randn(teacher.shape, generator=generator)
    assert_close(streamed(student, teacher, threshold=0.5), brute_force(student.numpy(), teacher.numpy(), 0.5))


def test_low_precision_outputs_are_scored_in_float32():
    student, teacher = saliency_pair()
    expected = brute_force(student.bfloat16().float().numpy(), teacher.bfloat16().float().numpy(), 0.8)
    assert_close(streamed(student.bfloat16(), teacher.bfloat16()), expected)


def test_identical_outputs_score_perfectly():
    student, _ = saliency_pair()
    result = streamed(student, student.clone())
    assert result["mae"] == result["rmse"] == result["relative_mse"] == 0.0
    assert result["pearson"] == result["iou"] == result["cosine"] == 1.0


def test_a_constant_teacher_map_counts_one_only_when_copied_exactly():
    teacher = torch.full((3, 1, 4, 4), 0.3)
    student = teacher.clone()
    student[1] = 0.4  # constant too, but another value
    student[2, 0, 0, 0] = 0.31  # nearly the teacher
    score = MapFidelity()
    score.update(student, teacher)
    result = score.result()
    assert result["pearson"] == pytest.approx(1 / 3) and result["constant_teacher"] == 3
    assert result["relative_mse"] is None  # error against teachers with no spread: undefined
    assert result["mae"] == pytest.approx((16 * 0.1 + 0.01) / 48)


def test_a_constant_student_against_a_varying_teacher_has_no_correlation():
    teacher = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4)
    score = MapFidelity()
    score.update(torch.full_like(teacher, 0.5), teacher)
    assert score.result()["pearson"] == 0.0
    assert score.result()["relative_mse"] == pytest.approx(float(((teacher - 0.5) ** 2).sum() / ((teacher - teacher.mean()) ** 2).sum()))


def test_iou_is_one_when_nothing_is_salient_on_either_side_and_zero_when_on_one_side():
    teacher = torch.full((2, 1, 3, 3), 0.1)
    student = teacher.clone()
    student[1, 0, 1, 1] = 0.9
    score = MapFidelity()
    score.update(student, teacher)
    assert score.result()["iou"] == pytest.approx(0.5)


def test_the_threshold_decides_what_is_salient_strictly_above_it():
    teacher = torch.tensor([[0.6, 0.9, 0.7, 0.1]])
    student = torch.tensor([[0.65, 0.9, 0.1, 0.7]])
    scores = {}
    for threshold in (0.5, 0.62, 0.7, 0.8):
        score = MapFidelity(threshold)
        score.update(student, teacher)
        scores[threshold] = score.result()
    assert scores[0.5]["iou"] == pytest.approx(2 / 4) and scores[0.5]["threshold"] == 0.5
    assert scores[0.62]["iou"] == pytest.approx(1 / 4)
    assert scores[0.7]["iou"] == 1.0  # 0.7, on one side each, is not above 0.7: only 0.9, on both
    assert scores[0.8]["iou"] == 1.0
    assert scores[0.5]["mae"] == scores[0.8]["mae"]  # the threshold touches iou only


def test_cosine_of_zero_outputs():
    zeros = torch.zeros(2, 5)
    teacher = zeros.clone()
    teacher[1, 0] = 1.0
    score = MapFidelity()
    score.update(zeros, teacher)  # both zero: identical, 1.0; only the student zero: 0.0
    assert score.result()["cosine"] == pytest.approx(0.5)


def test_no_images_reports_only_the_count_and_threshold():
    assert MapFidelity(0.5).result() == {"images": 0, "threshold": 0.5}


def test_outputs_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        MapFidelity().update(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))


def test_reducing_two_ranks_sums_every_running_sum(monkeypatch):
    """Two ranks' halves, reduced, give the one-process result; the collective is simulated by
    adding the other rank's numbers (a single process leaves reduce_across_ranks a no-op)."""
    student, teacher = saliency_pair()
    alone = MapFidelity()
    alone.update(student, teacher)
    before = alone.result()
    alone.reduce_across_ranks()
    assert alone.result() == before

    first, second = MapFidelity(), MapFidelity()
    first.update(student[:6], teacher[:6])
    second.update(student[6:], teacher[6:])
    sent = []
    monkeypatch.setattr(fidelity, "active", lambda: True)
    monkeypatch.setattr(fidelity, "sum_numbers", lambda *values: sent.append(values) or list(values))
    second.reduce_across_ranks()
    monkeypatch.setattr(fidelity, "sum_numbers", lambda *values: [a + b for a, b in zip(values, sent[0])])
    first.reduce_across_ranks()
    assert_close(first.result(), before)


def test_output_kind():
    assert output_kind(torch.zeros(2, 10), num_classes=10) == "logits"
    assert output_kind(torch.zeros(2, 1, 8, 8), num_classes=10) == "map"
    assert output_kind(torch.zeros(2, 10, 8, 8), num_classes=10) == "map"
    assert output_kind(torch.zeros(2, 197, 10), num_classes=10) == "features"
    assert output_kind(torch.zeros(2, 10), num_classes=0) == "features"
    assert output_kind(torch.zeros(2, 384), num_classes=10) == "features"


def test_dense_loss_values():
    generator = torch.Generator().manual_seed(2)
    teacher, student = torch.rand(3, 1, 4, 4, generator=generator), torch.rand(3, 1, 4, 4, generator=generator)
    mse = ((student - teacher) ** 2).flatten(1).mean(1)
    assert torch.allclose(dense_loss("map", student, teacher), mse)
    features = dense_loss("features", student, teacher)
    assert torch.allclose(features, mse / teacher.flatten(1).var(1, unbiased=False))
    assert torch.allclose(dense_loss("features", 10 * student, 10 * teacher), features)  # scale-free
    constant = torch.full_like(teacher, 0.5)
    assert torch.allclose(dense_loss("features", student, constant), ((student - 0.5) ** 2).flatten(1).mean(1))


@pytest.mark.parametrize("kind", ["map", "features"])
def test_dense_loss_gradients_flow_and_vanish_at_the_teacher(kind):
    generator = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 5, 3, generator=generator).bfloat16()
    student = torch.randn(2, 5, 3, generator=generator).bfloat16().requires_grad_()
    loss = dense_loss(kind, student, teacher)
    assert loss.shape == (2,) and loss.dtype == torch.float32
    loss.sum().backward()
    assert student.grad is not None and bool((student.grad != 0).any())

    copy = teacher.clone().requires_grad_()
    at_teacher = dense_loss(kind, copy, teacher)
    at_teacher.sum().backward()
    assert bool((at_teacher == 0).all()) and bool((copy.grad == 0).all())


def test_dense_loss_refuses_logits_and_unknown_kinds():
    with pytest.raises(ValueError, match="KL"):
        dense_loss("logits", torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown"):
        dense_loss("boxes", torch.zeros(2, 3), torch.zeros(2, 3))
