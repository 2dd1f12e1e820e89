"""``--method lowrank+cait``: the split's arithmetic, the importance masks, and the composed
model on small real models (recipe round trip, budgets, bad input)."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from conftest import COMPRESSIBLE, tiny_vit
from plain_vit import tiny_hf_vit, write_random_images

import vitslim
from vitslim.apps.cli import main
from vitslim.cait.importance import importance_masks
from vitslim.errors import VitslimError
from vitslim.io import image_batches, image_dataset, image_sources
from vitslim.io.recipe import steps as recipe_steps
from vitslim.lowrank_cait import (
    LowRankCait,
    Probe,
    Target,
    combine,
    compress_composed,
    fixed_params,
    probe_axes,
    split_target,
)
from vitslim.measure.metrics import count_params
from vitslim.methods import Inputs

TOTAL, FIXED = 1000, 200


def _probe(axis, level, cost, speedup, params=TOTAL, flops=None):
    return Probe(axis, level, cost, speedup, flops if flops is not None else 1 / speedup, params)


PROBES = [
    _probe("tokens", 1.2, 0.010, 1.2), _probe("tokens", 1.5, 0.050, 1.5), _probe("tokens", 2.0, 0.300, 2.0),
    _probe("lowrank", 0.7, 0.002, 1.1, params=760), _probe("lowrank", 0.5, 0.020, 1.3, params=600), _probe("lowrank", 0.3, 0.200, 1.6, params=440),
    _probe("channels", 0.7, 0.030, 1.4, params=760), _probe("channels", 0.5, 0.100, 2.0, params=600),
]


def _brute_force(probes, target):
    """Every subset of at most one probe per axis, written independently of split_target."""
    best = None
    axes = sorted({p.axis for p in probes})
    for choice in itertools.product(*[[None] + [p for p in probes if p.axis == axis] for axis in axes]):
        chosen = [p for p in choice if p]
        cost = sum(p.cost for p in chosen)
        speed = 1.0
        kept = 1.0
        for p in chosen:
            speed *= p.speedup
            kept *= (p.params - FIXED) / (TOTAL - FIXED)
        params = round(FIXED + kept * (TOTAL - FIXED))
        if (target.speedup and speed < target.speedup) or (target.params and params > target.params):
            continue
        if best is None or (cost, -speed) < best[0]:
            best = ((cost, -speed), {p.axis: p.level for p in chosen})
    return best


@pytest.mark.parametrize("target", [Target(speedup=1.5), Target(speedup=2.0), Target(speedup=2.0, params=600), Target(params=500),
                                    Target(speedup=2.4, params=450)])
def test_split_is_the_cheapest_feasible_combination(target):
    split = split_target(PROBES, target, total=TOTAL, fixed=FIXED)
    (cost, _), levels = _brute_force(PROBES, target)
    assert split.cost == pytest.approx(cost)
    assert {axis: level for axis, level in split.levels.items() if level != 1.0} == levels
    assert (target.speedup is None or split.speedup >= target.speedup) and (target.params is None or split.params <= target.params)


def test_split_prefers_a_free_axis_and_honours_a_required_one():
    free = PROBES + [_probe("lowrank", 0.2, 0.0, 1.6, params=360)]
    assert split_target(free, Target(speedup=1.5), total=TOTAL, fixed=FIXED).levels == {"channels": 1.0, "lowrank": 0.2, "tokens": 1.0}
    forced = split_target(PROBES, Target(speedup=1.5), total=TOTAL, fixed=FIXED, required=("channels",))
    assert forced.levels["channels"] < 1


def test_combine_compounds_parameter_cuts_on_the_compressible_weights():
    cost, speed, flops, params = combine([PROBES[4], PROBES[7], PROBES[1]], total=TOTAL, fixed=FIXED)
    assert cost == pytest.approx(0.17) and speed == pytest.approx(1.3 * 2.0 * 1.5)
    assert flops == pytest.approx(1 / (1.3 * 2.0 * 1.5))
    assert params == 200 + round(0.5 * 0.5 * 800)  # each keeps half of the 800 compressible weights


def test_untimed_probes_split_a_flops_target_and_cannot_promise_a_speed_up():
    untimed = [Probe(p.axis, p.level, p.cost, None, p.flops_ratio, p.params) for p in PROBES]
    split = split_target(untimed, Target(flops_ratio=0.5, params=600), total=TOTAL, fixed=FIXED)
    timed = split_target(PROBES, Target(flops_ratio=0.5, params=600), total=TOTAL, fixed=FIXED)
    assert split.speedup is None and split.levels == timed.levels and split.as_dict()["predicted"]["speedup"] is None
    with pytest.raises(VitslimError, match=r"strongest reaches FLOPs ratio"):
        split_target(untimed, Target(speedup=1.5), total=TOTAL, fixed=FIXED)


def test_unreachable_target_names_what_is_reachable():
    with pytest.raises(VitslimError, match="strongest reaches"):
        split_target(PROBES, Target(speedup=50.0), total=TOTAL, fixed=FIXED)
    with pytest.raises(VitslimError, match="state a target"):
        LowRankCait()


def test_importance_masks_keep_the_strongest_channels_at_the_ratio():
    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    block = model.blocks[0]
    with torch.no_grad():
        block.mlp.fc1.weight[7] *= 100  # hidden unit 7 dominates
        for part in range(2):  # query and key channel 5 of every head
            rows = block.attn.qkv.weight[part * 48: (part + 1) * 48].view(3, 16, 48)
            rows[:, 5] *= 100
    masks = importance_masks(model, 0.5)
    assert set(masks) == {"0", "1", "2"}
    entry = masks["0"]
    assert entry["qk"].sum() == 8 and entry["v"].sum() == 8 and entry["mlp"].sum() == 96
    assert entry["qk"][5] and entry["mlp"][7]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_random_images(tmp_path_factory.mktemp("images"), per_class=8, size=36)


def _logits(model):
    with torch.no_grad():
        return vitslim.describe(model).output(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


def test_three_axes_compose_meet_the_budget_and_reload_bit_identically(tmp_path, images):
    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    before = _logits(model)
    dataset = image_sources.open_images(images, image_dataset.build_transform(vitslim.describe(model).preprocessing))
    budget = int(0.6 * count_params(model))
    training = vitslim.Training(epochs=1, batch_size=8, progress=False)
    composed = vitslim.compress(model, "lowrank+cait", dataset, calib_images=len(dataset), calib_batch_size=8, flops_ratio=0.5, params=budget,
                                gate_training=training, channel_ratio=0.7, recovery=training, progress=False)
    assert torch.equal(_logits(model), before)  # the original is untouched
    steps = recipe_steps(composed)
    assert [step["method"] for step in steps] == ["channels", "lowrank", "merging", "lowrank+cait"]
    merging = steps[2]  # its concentration chosen on the calibration images, as the cait method chooses
    assert merging["concentration_kl"][f"{merging['concentration']:g}"] == min(merging["concentration_kl"].values())
    split = steps[-1]
    assert split["levels"]["channels"] == 0.7 and split["predicted"]["flops_ratio"] <= 0.5
    assert all(probe["speedup"] is None for probe in split["probes"])  # no speed-up stated: nothing timed
    assert count_params(composed) <= budget
    factorised = [module for module in composed.modules() if hasattr(module, "rank")]
    assert factorised and all(module.rank > 0 for module in factorised)  # factorised after slicing (which layers: the allocation's choice)
    folder = vitslim.save(composed, tmp_path / "composed")
    reloaded = vitslim.load_model(str(folder))
    assert torch.equal(_logits(reloaded), _logits(composed))
    assert json.loads((folder / "recipe.json").read_text())["steps"][-1]["levels"] == split["levels"]


def test_timed_probes_measure_speed_and_agree_with_untimed_ones_on_the_rest():
    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    calibration = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))]
    ladders = {"lowrank": (0.5,), "tokens": (1.3,)}
    timed = probe_axes(model, calibration, levels=ladders, runs=20, progress=False)
    untimed = probe_axes(model, calibration, levels=ladders, timed=False, progress=False)
    assert [(p.axis, p.level) for p in timed] == [("lowrank", 0.5), ("tokens", 1.3)]
    assert all(p.speedup > 0 for p in timed) and all(p.speedup is None for p in untimed)
    for a, b in zip(timed, untimed):
        assert (a.cost, a.params) == (b.cost, b.params) and a.flops_ratio == pytest.approx(b.flops_ratio)


def _composed(model, calibration, **settings):
    return compress_composed(model, LowRankCait(**settings), Inputs(calibration=calibration, progress=False))


def test_training_free_composition_uses_only_low_rank_and_tokens_on_hf(images):
    torch.manual_seed(0)
    model = tiny_hf_vit(num_labels=3).eval()
    dataset = image_sources.open_images(images, image_dataset.build_transform(vitslim.describe(model).preprocessing))
    composed = _composed(model, list(image_batches.make_loader(dataset, 8)), flops_ratio=0.6)
    split = recipe_steps(composed)[-1]
    assert split["levels"]["channels"] == 1.0 and {probe["axis"] for probe in split["probes"]} == {"lowrank", "tokens"}
    assert vitslim.evaluate(composed, images, teacher=model, progress=False)["flops"] < vitslim.evaluate(model, images, progress=False)["flops"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "state a target"),
    (dict(speedup=2.0, gate_training=vitslim.Training(epochs=1)), "training images"),
    (dict(speedup=2.0, axes=("lowrank", "depth")), "unknown axes"),
    (dict(param_ratio=1.2), "between 0 and 1"),
    (dict(params=10), "parameters no axis removes"),
    (dict(flops_ratio=0.5, channel_ratio=0.5), "channel pruning needs gate_training"),
])
def test_bad_input_is_refused_before_any_work(kwargs, message):
    with pytest.raises(VitslimError, match=message):
        _composed(tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE), [torch.zeros(2, 3, 32, 32)], **kwargs)


def test_cli_composed_compress_then_eval(tmp_path, images, capsys):
    folder = vitslim.save(tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE), tmp_path / "timm")
    out = tmp_path / "composed"
    assert main(["compress", str(folder), "--data", str(images), "--method", "lowrank+cait", "--flops-ratio", "0.6",
                 "--param-ratio", "0.7", "--calib-images", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "split:" in printed and "probe cost" in printed
    assert count_params(vitslim.load_model(str(out))) <= int(0.7 * count_params(vitslim.load_model(str(folder))))
    assert main(["eval", str(out), "--data", str(images), "--teacher", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 24
    assert main(["compress", str(folder), "--data", str(images), "--method", "lowrank+cait", "--calib-images", "16", "--out", str(tmp_path / "o")]) == 2
    assert "state a target" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_fixed_concentration_plans_the_composed_schedule_without_a_choice(images):
    from vitslim.cait.patch import merge_schedule
    from vitslim.cait.schedule import schedule_for_speedup

    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    dataset = image_sources.open_images(images, image_dataset.build_transform(vitslim.describe(model).preprocessing))
    composed = _composed(model, list(image_batches.make_loader(dataset, 8)), flops_ratio=0.7, axes=("tokens",), concentration=0.0)
    merging = next(step for step in recipe_steps(composed) if step["method"] == "merging")
    level = recipe_steps(composed)[-1]["levels"]["tokens"]
    assert merging["concentration"] == 0.0 and "concentration_kl" not in merging
    assert merge_schedule(composed) == schedule_for_speedup(vitslim.describe(model), "atme", level, concentration=0.0)
    assert merge_schedule(composed) != schedule_for_speedup(vitslim.describe(model), "atme", level)  # not the default shape


def test_fixed_params_counts_what_no_axis_removes():
    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    linears = sum(layer.weight.numel() for block in model.blocks for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2))
    assert fixed_params(model) == count_params(model) - linears


def test_cli_refuses_low_rank_knobs_the_composition_would_ignore(tmp_path, images, capsys):
    folder = vitslim.save(tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE), tmp_path / "timm")
    assert main(["compress", str(folder), "--data", str(images), "--method", "lowrank+cait", "--flops-ratio", "0.6",
                 "--rank-multiple", "8", "--out", str(tmp_path / "o")]) == 2
    assert "--rank-multiple does not apply to --method lowrank+cait" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_merging_cost_bound_accepts_the_plan_and_refuses_merging_almost_everything():
    """The bound ``lowrank+cait`` gives its speed check: the planned schedule's own cost passes,
    the strongest schedule (a few tokens left by the last block) costs far more than 1.5x it."""
    from vitslim.cait.schedule import schedule_for_speedup, strongest_schedule
    from vitslim.lowrank_cait import merging_cost_bound

    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE).eval()
    spec = vitslim.describe(model)
    batches = [torch.randn(4, 3, *spec.preprocessing.input_size[1:], generator=torch.Generator().manual_seed(seed)) for seed in range(2)]
    planned = schedule_for_speedup(spec, "atme", 1.15)
    affordable = merging_cost_bound(copy.deepcopy(model), model, planned, batches, images=8, objective="auto", full_map_after=None)
    assert affordable(planned)
    assert not affordable(strongest_schedule(spec, "atme", 1.0))
