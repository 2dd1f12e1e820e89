"""CDCP channel gates and slicing (vitslim.cait.gates, vitslim.cait.slicing): exact masks, exact
slicing for every family and both gate kinds, the straight-through gradient, the FLOPs estimate
against a counted forward pass, save/reload of sliced models, the budget schedule under distill,
and refusals."""

import copy
import json
import logging
import math

import pytest
import torch
from conftest import outputs, tiny_vit
from plain_vit import PlainViT, tiny_hf_vit
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vitslim
from vitslim.cait.gates import BUDGET_REACH, GATES_ATTR, attach_gates, channel_scores, detach_gates
from vitslim.cait.slicing import slice_channels
from vitslim.errors import VitslimError
from vitslim.io.persist import RECIPE_FILE
from vitslim.io.recipe import steps as recipe_steps
from vitslim.measure.metrics import count_params
from vitslim.train import LR_SCALE_ATTR

CHANNEL_GEOMETRY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10)  # 17 tokens, head_dim 16


def _model(family):
    if family == "timm":
        return tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY)
    if family == "hf":
        return tiny_hf_vit()
    torch.manual_seed(0)
    return PlainViT().eval()


def _images(count=4, seed=1):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _packed_for_good() -> PlainViT:
    """A plain ViT whose attention (add_zero_attn) vitslim cannot unpack, so it stays packed."""
    model = PlainViT()
    for layer in model.encoder.layers:
        layer.self_attn = nn.MultiheadAttention(32, 2, add_zero_attn=True, batch_first=True)
    return model


def _structure(model):
    return [(name, type(module).__name__) for name, module in model.named_modules()]


def _randomise(gates, seed=0):
    """Random gate logits: query/key channels pruned more often than value channels, so the two
    counts differ, and every block keeps a different number of MLP units."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group, shift in ((gates.qk, -0.4), (gates.v, 0.4), (gates.mlp, 0.0)):
            for logit in group.values():
                logit.copy_(torch.randn(logit.shape, generator=generator) + shift)


@pytest.mark.parametrize("family", ["timm", "hf", "torch"])
def test_fresh_gates_change_nothing_and_detach_restores_the_model(family):
    model = _model(family)
    vitslim.adapters.family_of(model).unpack_attention(model)  # torch: what attach_gates does first (same function, to rounding)
    images = _images()
    before, structure = outputs(model, images), _structure(model)
    gates = attach_gates(model)
    assert getattr(model, GATES_ATTR) is gates
    assert all(getattr(p, LR_SCALE_ATTR) == 100.0 and p.ndim == 1 for p in gates.parameters())
    assert {id(p) for p in gates.parameters()} <= {id(p) for p in model.parameters()}  # distill trains them
    assert torch.equal(outputs(model, images), before)
    assert detach_gates(model) is gates
    assert not hasattr(model, GATES_ATTR) and _structure(model) == structure
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(outputs(model, images), before)


def test_gate_shapes_and_a_deep_copy_keeps_working_gates():
    model = tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY)
    consistent = attach_gates(model)
    assert [tuple(p.shape) for p in consistent.qk.values()] == [(16,), (16,)]  # shared by the 3 heads
    assert [tuple(p.shape) for p in consistent.mlp.values()] == [(192,), (192,)]
    detach_gates(model)
    free = attach_gates(model, consistent=False, lr_scale=30.0)
    assert [tuple(p.shape) for p in free.v.values()] == [(48,), (48,)]  # one mask per head
    copied = copy.deepcopy(model)
    copied_gates = getattr(copied, GATES_ATTR)
    assert all(getattr(p, LR_SCALE_ATTR) == 30.0 for p in copied_gates.parameters())
    with torch.no_grad():
        copied_gates.mlp["0"].fill_(-1.0)  # prunes the copy only
    images = _images()
    assert not torch.equal(outputs(copied, images), outputs(model, images))
    detach_gates(copied)
    assert hasattr(model, GATES_ATTR) and any(m._forward_hooks for m in model.modules())


def test_a_pruned_channel_still_gets_a_gradient():
    model = tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY)
    gates = attach_gates(model)
    with torch.no_grad():
        gates.v["0"][3] = -2.0
        gates.mlp["1"][7] = -2.0
    model(_images()).square().sum().backward()
    assert gates.masks()["0"]["v"][:, 3].eq(False).all()
    assert gates.v["0"].grad[3] != 0 and gates.mlp["1"].grad[7] != 0


@pytest.mark.parametrize("family, consistent", [("timm", True), ("timm", False), ("hf", True), ("hf", False), ("torch", True)])
def test_sliced_model_computes_what_the_masked_model_did_and_reloads(tmp_path, family, consistent):
    model = _model(family)
    images = _images()
    params = count_params(model)
    gates = attach_gates(model, consistent=consistent)
    _randomise(gates)
    kept = gates.kept()
    if family != "torch":
        assert any(entry["qk"] != entry["v"] for entry in kept.values())
    if not consistent:
        assert any(len(set(entry["qk"])) > 1 for entry in kept.values())  # heads differ
    masked = outputs(model, images)

    result = slice_channels(model)
    sliced = outputs(model, images)
    assert torch.allclose(sliced, masked, atol=1e-5, rtol=0)
    assert not hasattr(model, GATES_ATTR) and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(isinstance(p, nn.Parameter) and not hasattr(p, LR_SCALE_ATTR) for p in model.parameters())
    assert count_params(model) < params
    spec = vitslim.describe(model)
    step = recipe_steps(model)[-1]
    assert step["method"] == "channels" and step["consistent"] == consistent
    for block in spec.blocks:
        recorded, detail = step["blocks"][str(block.index)], result["blocks"][str(block.index)]
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == recorded["mlp_hidden"] == kept[str(block.index)]["mlp"]
        assert detail["mlp"] == sorted(detail["mlp"]) and len(detail["mlp"]) == recorded["mlp_hidden"]
        width = max(max(kept[str(block.index)]["qk"]), max(kept[str(block.index)]["v"]))
        assert recorded["head_dim"] == block.attention.head_dim == width
        assert [len(channels) for channels in detail["qk"]] == kept[str(block.index)]["qk"]
        assert block.attention.out_proj.in_features == block.attention.num_heads * width

    folder = vitslim.save(model, tmp_path / "sliced")
    assert json.loads((folder / RECIPE_FILE).read_text())["steps"] == recipe_steps(model)  # torch: the attention unpacked first
    reloaded = vitslim.load_model(folder, skeleton=PlainViT() if family == "torch" else None)
    assert torch.equal(outputs(reloaded, images), sliced)


def test_explicit_masks_slice_only_what_they_name(tmp_path):
    model = tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY)  # made by timm.create_model, so save() reads its arguments back from the modules
    images = _images()
    gates = attach_gates(model)
    with torch.no_grad():
        gates.mlp["0"][::3] = -1.0  # block 0 keeps 128 of 192 hidden units
        gates.qk["1"].fill_(-1.0)  # block 1: no query/key channel left, so uniform attention
        gates.v["1"][5:] = -1.0
    masked = outputs(model, images)
    masks = gates.masks()
    detach_gates(model)
    result = slice_channels(model, masks={"0": {"mlp": masks["0"]["mlp"]}, "1": {"qk": masks["1"]["qk"][0], "v": masks["1"]["v"]}})
    assert recipe_steps(model)[-1]["blocks"] == {"0": {"mlp_hidden": 128}, "1": {"head_dim": 5}}
    assert result["blocks"]["1"]["qk"] == [[], [], []] and result["blocks"]["1"]["v"] == [[0, 1, 2, 3, 4]] * 3
    assert torch.allclose(outputs(model, images), masked, atol=1e-5, rtol=0)
    assert model.blocks[1].mlp.fc1.out_features == 192 and model.blocks[0].attn.head_dim == 16
    assert model.blocks[1].attn.qkv.out_features == 3 * 3 * 5 and model.blocks[1].attn.scale == 5**-0.5
    reloaded = vitslim.load_model(vitslim.save(model, tmp_path / "out"))
    assert torch.equal(outputs(reloaded, images), outputs(model, images))


def test_nothing_kept_leaves_one_zeroed_channel():
    model = tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY)
    images = _images()
    gates = attach_gates(model)
    with torch.no_grad():
        for group in (gates.qk, gates.v, gates.mlp):
            group["0"].fill_(-1.0)
    masked = outputs(model, images)
    slice_channels(model, gates)
    assert recipe_steps(model)[-1]["blocks"]["0"] == {"head_dim": 1, "mlp_hidden": 1}
    assert torch.allclose(outputs(model, images), masked, atol=1e-5, rtol=0)


def _block_flops(model, tokens):
    """FLOPs of each block's forward pass on one image of ``tokens`` tokens, as torch counts them."""
    counts = []
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit matmuls, which the counter sees (CPU SDPA it does not)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            block(torch.zeros(1, tokens[len(counts)], model.embed_dim))
        counts.append(counter.get_total_flops())
    return counts


@pytest.mark.parametrize("consistent", [True, False])
def test_flops_ratio_is_the_sliced_models_counted_flops(consistent):
    model = tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY)
    tokens = [17, 9]  # e.g. after token merging in the second block
    dense = _block_flops(copy.deepcopy(model), tokens)
    gates = attach_gates(model, consistent=consistent)
    _randomise(gates, seed=3)
    estimate, default = gates.flops_ratio(tokens), gates.flops_ratio()
    assert estimate.requires_grad
    slice_channels(model)
    counted = _block_flops(model, tokens)
    assert float(estimate.detach()) == pytest.approx(sum(counted) / sum(dense), rel=1e-6)
    assert float(default.detach()) == pytest.approx(sum(_block_flops(model, [17, 17])) / sum(_block_flops(tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY), [17, 17])), rel=1e-6)


def _hard_ratio(gates, level):
    return float(gates._ratio(gates._token_counts(None), level=torch.tensor(level)))


def test_follow_budget_keeps_the_most_channels_within_the_ceiling():
    gates = attach_gates(tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY))
    _randomise(gates, seed=5)
    for target in (0.9, 0.5, 0.2):
        assert gates.follow_budget(target) == target  # no run length: the target at once
        ratio = float(gates.flops_ratio().detach())
        assert ratio <= target
        # brute force over every threshold: the one chosen is the lowest within the target
        levels = sorted({float(v) for logit in gates.parameters() for v in logit.detach()})
        within = [level for level in [levels[0] - 1] + levels if _hard_ratio(gates, level) <= target]
        assert float(gates.threshold) == within[0]
        assert ratio == pytest.approx(_hard_ratio(gates, within[0]))
        kept = gates.masks()
        assert all(bool((mask == (gates.mlp[key] > gates.threshold)).all()) for key, entry in kept.items() for kind, mask in entry.items()
                   if kind == "mlp")
    with pytest.raises(VitslimError, match="out of reach"):
        gates.follow_budget(0.02)


def test_the_ceiling_comes_down_a_cubic_and_holds_the_target():
    gates = attach_gates(tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY))
    for steps in (30, 101, 5000):
        ceilings = [gates.ceiling(0.4, steps, step) for step in range(steps)]
        reach = BUDGET_REACH * steps
        assert ceilings[0] == 1.0 and all(a >= b for a, b in zip(ceilings, ceilings[1:]))
        assert all(c == pytest.approx(0.4) for step, c in enumerate(ceilings) if step >= reach)
        assert all(c > 0.4 for step, c in enumerate(ceilings) if step < reach)
        middle = int(reach / 2)
        assert ceilings[middle] == pytest.approx(0.4 + 0.6 * (1 - middle / reach) ** 3)


def test_a_pruned_channel_whose_logit_rises_comes_back():
    gates = attach_gates(tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY))
    _randomise(gates, seed=2)
    gates.follow_budget(0.6)
    logits = gates.mlp["0"]
    pruned = int((logits <= gates.threshold).nonzero()[0])
    with torch.no_grad():
        logits[pruned] = float(logits.max()) + 1.0
    gates.follow_budget(0.6)
    assert bool(gates.masks()["0"]["mlp"][pruned]) and float(gates.flops_ratio().detach()) <= 0.6


def test_ties_go_to_the_more_important_channel():
    model = tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.2)
    gates = attach_gates(model)
    scores = channel_scores(model)
    for key, logit in gates.mlp.items():
        assert torch.equal(logit.argsort(), scores[key]["mlp"].argsort())
        assert float((logit.max() - logit.min()).detach()) <= 1e-3 + 1e-6
    for key, logit in gates.qk.items():
        assert torch.equal(logit.argsort(), scores[key]["qk"].sum(0).argsort())
    gates.follow_budget(0.7)  # fresh gates: the pruned channels are the least important ones
    for key, mask in gates.masks().items():
        order = scores[key]["mlp"].argsort()
        assert not mask["mlp"][order[: int((~mask["mlp"]).sum())]].any()


def _sharp_teacher():
    """A random ViT whose outputs depend on its channels: with timm's initialisation (std 0.02)
    the blocks barely touch the residual stream, so pruning would cost no distillation loss and
    every gate would simply fall through the threshold."""
    model = tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("steps", [30, 120])
def test_distillation_reaches_the_budget_within_the_first_half_of_a_run(steps):
    teacher = _sharp_teacher()
    student = copy.deepcopy(teacher)
    gates = attach_gates(student)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(steps)]
    target, ratios = 0.5, []

    def follow(model, step, total):
        assert total == steps
        gates.follow_budget(target, step=step, steps=total)
        ratios.append(float(gates.flops_ratio().detach()))

    vitslim.distill(student, teacher, batches, vitslim.Training(epochs=1, lr=1e-3, progress=False), before_step=follow)
    assert len(ratios) == steps and ratios[0] == 1.0
    half = ratios[steps // 2 - 1]
    assert 1 - half >= 0.95 * (1 - target)  # ≥ 95% of the asked reduction within the first half
    assert all(ratio <= target for ratio in ratios[math.ceil(BUDGET_REACH * steps):])
    assert ratios[-1] >= target - 0.05  # at the budget, not collapsed past it
    slice_channels(student, gates)
    assert count_params(student) < count_params(teacher)


def test_parts_that_cannot_be_sliced_exactly_are_left_dense(caplog):
    with caplog.at_level(logging.WARNING, logger="vitslim"):
        gates = attach_gates(tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY, qk_norm=True))
    assert not any(block.attention for block in gates.blocks) and all(block.mlp for block in gates.blocks)
    assert "q/k norm" in caplog.text
    with pytest.raises(VitslimError, match="no channel of this model can be gated.*packed nn.MultiheadAttention"):
        attach_gates(_packed_for_good(), prune_mlp=False)


def test_bad_requests_are_refused():
    model = tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY)
    with pytest.raises(VitslimError, match="no channel gates"):
        slice_channels(model)
    with pytest.raises(VitslimError, match="no channel gates"):
        detach_gates(model)
    gates = attach_gates(model)
    with pytest.raises(VitslimError, match="already carries"):
        attach_gates(model)
    with pytest.raises(VitslimError, match="not attached"):
        slice_channels(tiny_vit(name="vit_tiny_patch16_224", **CHANNEL_GEOMETRY), gates)
    with pytest.raises(VitslimError, match="FLOPs target"):
        gates.follow_budget(1.5)
    with pytest.raises(VitslimError, match="one token count per block"):
        gates.flops_ratio([17])
    detach_gates(model)
    with pytest.raises(VitslimError, match="shape"):
        slice_channels(model, masks={"0": {"qk": torch.ones(5, dtype=torch.bool), "v": torch.ones(16, dtype=torch.bool)}})
    with pytest.raises(VitslimError, match="no block"):
        slice_channels(model, masks={"7": {"mlp": torch.ones(192, dtype=torch.bool)}})
    with pytest.raises(VitslimError, match="cannot be sliced.*packed"):
        slice_channels(_packed_for_good(), masks={"0": {"qk": torch.ones(16, dtype=torch.bool), "v": torch.ones(16, dtype=torch.bool)}})
