import math

import pytest
import torch
from conftest import tiny_vit
from torch import nn
from torch.nn import functional as F

from vitslim.errors import VitslimError
from vitslim.measure.bench import benchmark, noise_warning, ratio_text, round_ratios, spread
from vitslim.measure.metrics import ClassificationScore, count_flops, count_params


def test_flops_of_a_linear_are_two_per_multiply_add():
    assert count_flops(nn.Linear(7, 5), (7,)) == 2 * 7 * 5


def test_fused_attention_flops_match_the_explicit_matmuls():
    """CPU SDPA has no rule in FlopCounterMode; ours must count what the math path counts."""
    model = tiny_vit(seed=None, num_classes=10)
    fused = count_flops(model, (3, 32, 32))
    for block in model.blocks:
        block.attn.fused_attn = False
    explicit = count_flops(model, (3, 32, 32))
    tokens, dim = 17, 32
    attention_matmuls = 2 * (2 * tokens * tokens * dim) * 2  # q@k and attn@v, two blocks
    assert fused == explicit
    linears_only = sum(2 * m.in_features * m.out_features * tokens for m in model.blocks.modules() if isinstance(m, nn.Linear))
    assert fused >= linears_only + attention_matmuls


def test_params_count_shared_tensors_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared)
    assert count_params(model) == 20


def test_classification_score_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=generator)
    teacher = torch.randn(50, 8, generator=generator)
    labels = torch.randint(0, 8, (50,), generator=generator)
    score = ClassificationScore(8)
    score.update(logits[:20], labels[:20], teacher[:20])
    score.update(logits[20:], labels[20:], teacher[20:])
    result = score.result()
    top5 = [labels[i].item() in logits[i].topk(5).indices.tolist() for i in range(50)]
    kl = [sum(math.exp(t) * (t - s) for t, s in zip(F.log_softmax(teacher[i], 0).tolist(), F.log_softmax(logits[i], 0).tolist())) for i in range(50)]
    assert result["images"] == 50
    assert result["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result["top5"] == pytest.approx(sum(top5) / 50)
    assert result["agreement"] == pytest.approx((logits.argmax(1) == teacher.argmax(1)).float().mean().item())
    assert result["kl"] == pytest.approx(sum(kl) / 50, rel=1e-5)


def test_unlabelled_batches_count_towards_agreement_but_not_accuracy():
    logits, teacher = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    score = ClassificationScore(4)
    score.update(logits[:3], labels, teacher[:3])
    score.update(logits[3:], None, teacher[3:])
    result = score.result()
    assert result["images"] == 6
    assert result["top1"] == pytest.approx((logits[:3].argmax(1) == labels).double().mean().item())
    assert result["agreement"] == pytest.approx((logits.argmax(1) == teacher.argmax(1)).double().mean().item())
    only_unlabelled = ClassificationScore(4)
    only_unlabelled.update(logits, None, teacher)
    assert "top1" not in only_unlabelled.result() and only_unlabelled.result()["images"] == 6


def test_top5_falls_back_to_all_classes_when_there_are_fewer():
    score = ClassificationScore(3)
    score.update(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([2]))
    assert score.result()["top5"] == 1.0 and score.result()["top5_is_top"] == 3


def test_benchmark_reports_every_model_with_ratios_to_the_first():
    small = tiny_vit(seed=None, num_classes=10)
    wide = tiny_vit(seed=None, num_classes=10, embed_dim=128)
    results = benchmark([("small", small), ("wide", wide)], batch_size=2, runs=20, warmup=1, progress=False)
    assert [r.model for r in results] == ["small", "wide"]
    assert results[0].ratio == 1.0
    assert results[1].ratio == pytest.approx(results[1].images_per_s / results[0].images_per_s)
    assert results[1].params == count_params(wide) and results[1].flops > results[0].flops
    assert all(r.peak_memory_mb > 0 and r.latency_ms > 0 and r.runs == 20 for r in results)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "^batch_size must be at least 1"),
    ({"runs": 5}, "at least 20"),
    ({"dtype": "int3"}, "^dtype is 'int3'; choose one of"),
    ({"threads": 0}, "^threads must be at least 1"),
])
def test_benchmark_rejects_bad_settings(kwargs, message):
    model = tiny_vit(seed=None, num_classes=10)
    with pytest.raises(VitslimError, match=message):
        benchmark([("m", model)], progress=False, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_benchmark_on_missing_cuda_is_a_clear_error():
    with pytest.raises(VitslimError, match="no CUDA"):
        benchmark([("m", tiny_vit(seed=None, num_classes=10))], device="cuda", progress=False)


def test_ratio_spread_is_the_relative_interquartile_range_of_the_rounds_ratios():
    assert round_ratios([2.0, 3.0, 4.0], [1.0, 1.0, 2.0]) == [2.0, 3.0, 2.0]
    # quartiles (inclusive) of 1, 2, 3, 4, 5: 2 and 4, median 3
    assert spread([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx(2 / 3)
    assert spread([1.5] * 20) == 0.0 and spread([7.0]) == 0.0


def test_benchmark_flags_a_run_whose_rounds_disagree(monkeypatch):
    """A made-up clock: the reference takes 10 ms every round; the second model 5 ms, except in
    every other round, where a busy machine makes it 15 ms. Its ratio spread says so, and only
    its; a steady third model is not flagged."""
    import vitslim.measure.bench as bench

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    calls = {"busy": 0}

    def advance(seconds):
        def hook(module, args, output):
            clock[0] += seconds() if callable(seconds) else seconds
        return hook

    def busy_seconds():
        calls["busy"] += 1
        return 0.015 if calls["busy"] % 2 else 0.005

    reference, busy, steady = tiny_vit(seed=0), tiny_vit(seed=1), tiny_vit(seed=2)
    reference.register_forward_hook(advance(0.010))
    busy.register_forward_hook(advance(busy_seconds))
    steady.register_forward_hook(advance(0.005))
    results = benchmark([("reference", reference), ("busy", busy), ("steady", steady)], batch_size=2, warmup=0, runs=20, progress=False)
    assert [result.ratio_spread for result in results] == [0.0, pytest.approx((2.0 - 2 / 3) / ((2.0 + 2 / 3) / 2)), 0.0]
    assert [result.noisy for result in results] == [False, True, False]
    assert results[2].ratio == pytest.approx(2.0) and results[1].as_dict()["noisy"]
    assert "unstable timings for busy (eager)" in noise_warning(results) and noise_warning(results[::2]) is None
    assert ratio_text(results[2]) == "2.00x" and ratio_text(results[1]).endswith("(noisy: spread 100%)")
