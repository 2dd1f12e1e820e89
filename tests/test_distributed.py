"""Runs under ``torchrun`` with 2 gloo processes on CPU: the same compressed weights and the same
evaluation as one process, outputs written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from conftest import COMPRESSIBLE, tiny_vit
from plain_vit import write_random_images

import vitslim
from vitslim.apps.cli import main


def _torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m", "vitslim", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    model = tiny_vit(name="vit_tiny_patch16_224", **COMPRESSIBLE)
    (root / "images").mkdir()
    return root, vitslim.save(model, root / "timm"), write_random_images(root / "images", per_class=8, size=36)


def test_two_processes_calibrate_and_distil_to_the_same_weights_as_one(setup):
    root, folder, images = setup
    # 16 calibration images in 2 batches, 24 training images in 3 global batches of 8 (4 per rank)
    options = ["--data", str(images), "--param-ratio", "0.5", "--calib-images", "16", "--batch-size", "8", "--recovery-epochs", "1"]
    assert main(["compress", str(folder), *options, "--out", str(root / "one")]) == 0
    run = _torchrun("compress", str(folder), *options, "--out", str(root / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved to") == 1  # rank 0 alone reports and writes
    one = safetensors.torch.load_file(str(root / "one" / "model.safetensors"))
    two = safetensors.torch.load_file(str(root / "two" / "model.safetensors"))
    assert one.keys() == two.keys()
    worst = max(float((one[name] - two[name]).abs().max()) for name in one)
    assert worst < 1e-5, worst  # measured 2e-7; without DDP's gradient averaging it is 4e-4
    ranks = [json.loads((root / name / "recipe.json").read_text())["steps"][0]["ranks"] for name in ("one", "two")]
    assert ranks[0] == ranks[1]  # the allocation saw the same statistics
    assert not any(path.name.startswith(".") for path in root.iterdir())  # no staging folder left behind


def test_sharded_evaluation_equals_one_process(setup, capsys):
    root, folder, images = setup
    assert main(["eval", str(folder), "--data", str(images), "--teacher", str(folder), "--batch-size", "5", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    run = _torchrun("eval", str(folder), "--data", str(images), "--teacher", str(folder), "--batch-size", "5", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    sharded = json.loads(run.stdout)  # exactly one JSON object: rank 1 prints nothing
    assert sharded["images"] == single["images"] == 24
    assert sharded["top1"] == single["top1"] and sharded["agreement"] == 1.0
    assert sharded["kl"] == pytest.approx(single["kl"], abs=1e-6)


def test_commands_that_time_models_refuse_torchrun(setup):
    root, folder, _ = setup
    run = _torchrun("bench", str(folder), "--batch-size", "2")
    assert run.returncode != 0 and "runs in one process" in run.stderr


def test_channel_pruning_with_merging_trains_under_ddp_and_writes_once(setup):
    """CDCP's gates (a hooked submodule with an adaptive buffer) and ATME's hooks under
    DistributedDataParallel; the schedule's concentration is chosen and the --speedup timing
    run on rank 0, and both are shared."""
    root, folder, images = setup
    out = root / "cait"
    run = _torchrun("compress", str(folder), "--data", str(images), "--method", "cait", "--speedup", "1.5", "--gate-epochs", "1",
                    "--batch-size", "8", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved to") == 1
    steps = json.loads((out / "recipe.json").read_text())["steps"]
    assert [step["method"] for step in steps] == ["channels", "merging"]
    assert len(steps[1]["concentration_kl"]) == 4  # chosen on rank 0, shared with rank 1
    reloaded = vitslim.load_model(str(out))
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.randn(2, 3, 32, 32))).all()


def test_shutdown_leaves_the_process_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from vitslim._infra import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed.shutdown(clean=True)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    distributed.shutdown(clean=True)
    distributed.shutdown(clean=False)
