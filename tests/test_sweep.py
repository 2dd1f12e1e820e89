"""``vitslim sweep``: a grid of methods and budgets, scored, timed in one run, plotted, resumable."""

from __future__ import annotations

import json

import pytest
from conftest import COMPRESSIBLE, tiny_vit
from plain_vit import write_random_images

import vitslim
import vitslim.apps.sweep
from vitslim.apps.cli import main
from vitslim.apps.sweep import Point, parse_budgets
from vitslim.errors import VitslimError
from vitslim.io.recipe import steps as recipe_steps


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    folder = vitslim.save(model, root / "model")
    (root / "train").mkdir()
    (root / "heldout").mkdir()
    train = write_random_images(root / "train", per_class=6, size=32)
    heldout = write_random_images(root / "heldout", per_class=4, size=32)
    return folder, train, heldout, root


def _sweep(setup, out, *extra):
    folder, train, heldout, _ = setup
    return main(["sweep", str(folder), "--data", str(train), "--eval-data", str(heldout), "--budgets", "lowrank=0.6,0.4",
                 "--budgets", "cait=1.3", "--out", str(out), "--calib-images", "8", *extra])


def test_sweep_scores_times_and_plots_every_point_then_resumes(setup, monkeypatch, capsys):
    out = setup[3] / "run"
    assert _sweep(setup, out, "--reference", str(setup[0])) == 0
    rows = json.loads((out / "points.json").read_text())
    names = [r["name"] for r in rows]
    assert names[0] == "original" and set(names) == {"original", f"reference {setup[0]}", "lowrank-0.6", "lowrank-0.4", "cait-1.3"}
    by_name = {r["name"]: r for r in rows}
    assert by_name["lowrank-0.4"]["params"] < by_name["lowrank-0.6"]["params"] < by_name["original"]["params"]
    assert by_name["original"]["ratio"] == 1.0 and all(r["ratio"] > 0 for r in rows)
    assert by_name["cait-1.3"]["params"] == by_name["original"]["params"]
    assert (out / "pareto.png").stat().st_size > 0 and "| lowrank-0.4 |" in (out / "report.md").read_text()
    reloaded = vitslim.load_model(str(out / by_name["lowrank-0.4"]["folder"]))
    assert sum(p.numel() for p in reloaded.parameters()) == by_name["lowrank-0.4"]["params"]

    # a rerun (say, after an interruption) compresses only the points it has no model for
    (out / "models" / "cait-1.3").rename(out / "lost")
    compressed = []
    real = vitslim.apps.sweep._compress
    monkeypatch.setattr(vitslim.apps.sweep, "_compress", lambda original, point, *args: compressed.append(point) or real(original, point, *args))
    capsys.readouterr()
    assert _sweep(setup, out, "--reference", str(setup[0])) == 0
    assert compressed == [Point("cait", 1.3)]
    assert "lowrank-0.6: already measured" in capsys.readouterr().out
    assert len(json.loads((out / "points.json").read_text())) == 5


def test_too_few_timing_runs_are_refused_before_any_work(setup, capsys):
    assert _sweep(setup, setup[3] / "few", "--runs", "5") == 2
    assert "at least 20" in capsys.readouterr().err and not (setup[3] / "few").exists()


@pytest.mark.parametrize("specs, message", [
    (["lowrank"], "METHOD=V"),
    (["pruning=0.5"], "^budgets name method 'pruning', which has no sweep budget"),
    (["lowrank=1.5"], "fractions of the parameters"),
    (["cait=0.5"], "speed-ups"),
    (["lowrank=0.5,x"], "not a number"),
    (["lowrank=0.5", "lowrank=0.5"], "twice"),
    (["cait=1.5@0.5"], "only lowrank\\+cait takes a parameter cap"),
    (["lowrank+cait=0.5"], "FLOPs reduction factors"),
    (["lowrank+cait=2@1.5"], "parameter caps are fractions"),
    (["lowrank+cait=2@x"], "not a number"),
])
def test_bad_budgets_are_refused(specs, message):
    with pytest.raises(VitslimError, match=message):
        parse_budgets(specs)


def test_composed_budgets_parse_with_and_without_a_parameter_cap():
    points = parse_budgets(["lowrank+cait=2@0.5,1.5"])
    assert points == [Point("lowrank+cait", 2.0, 0.5), Point("lowrank+cait", 1.5)]
    assert [p.name for p in points] == ["lowrank+cait-2@0.5", "lowrank+cait-1.5"]


def test_a_composed_point_meets_its_caps_and_records_its_distillation(setup):
    """One composed point with KD: its FLOPs and parameter caps hold, the row states the epochs
    it trained, and the folder reloads to the scored model."""
    folder, train, heldout, root = setup
    out = root / "composed"
    assert main(["sweep", str(folder), "--data", str(train), "--eval-data", str(heldout), "--budgets", "lowrank+cait=1.2@0.6",
                 "--out", str(out), "--calib-images", "8", "--epochs", "1"]) == 0
    rows = {r["name"]: r for r in json.loads((out / "points.json").read_text())}
    point = rows["lowrank+cait-1.2@0.6"]
    assert point["params"] <= 0.6 * rows["original"]["params"] and point["param_ratio"] == 0.6
    assert point["flops"] <= rows["original"]["flops"] / 1.2
    reloaded = vitslim.load_model(str(out / point["folder"]))
    steps = [step["method"] for step in recipe_steps(reloaded)]
    assert "lowrank+cait" in steps and point["kd_epochs"] == (2 if "channels" in steps else 1)
    assert sum(p.numel() for p in reloaded.parameters()) == point["params"]
    assert "| lowrank+cait-1.2@0.6 | " in (out / "report.md").read_text()


def test_cli_refuses_bad_input_before_any_work(setup, capsys):
    folder, train, heldout, root = setup
    assert main(["sweep", str(folder), "--data", str(train), "--eval-data", str(heldout), "--budgets", "cait=0.9", "--out", str(root / "bad")]) == 2
    assert "speed-ups" in capsys.readouterr().err and not (root / "bad").exists()
    assert main(["sweep", str(folder), "--data", str(train), "--eval-data", str(heldout), "--budgets", "cait=1.3", "--out", str(root / "bad"),
                 "--calib-images", "500"]) == 2
    assert "error: --calib-images is 500, more than the" in capsys.readouterr().err and not (root / "bad").exists()
