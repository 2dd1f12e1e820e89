"""benchmarks/gpu.py without a GPU: its CPU smoke run writes the one table and its JSON with every
method row, each original at 1.00x in its own cell; without CUDA and without the smoke flag it
refuses with a message saying why, instead of timing a CPU and calling it a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
METHODS = ["original", "low-rank 50%", "low-rank 40%", "ATME 1.5x", "ATME 2.0x", "ToMe 1.5x", "ToMe 2.0x", "ATME + CDCP 2.0x",
           "low-rank 50% + ATME 1.5x"]


def run_script(*arguments: str, hide_cuda: bool = False) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if hide_cuda:  # so that the refusal is tested on a CUDA machine too
        environment["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def smoke(out: Path, *arguments: str) -> tuple[str, dict]:
    """The smoke run's table and JSON, written to ``out``."""
    done = run_script("--cpu-smoke", "--out", str(out), *arguments)
    assert done.returncode == 0, done.stderr[-3000:]
    return (out / "gpu.md").read_text(), json.loads((out / "gpu.json").read_text())


def check_cells(table: str, result: dict, cells: list[str]) -> None:
    """Every cell a column of the table, every method a row, measured in every cell, the
    original at exactly 1.00x."""
    header = next(line for line in table.splitlines() if line.startswith("| geometry"))
    assert all(cell in header for cell in cells)
    for method in METHODS:
        assert f"| tiny | {method} |" in table
    assert [model["method"] for model in result["models"]] == METHODS
    for cell in cells:
        measured = {row["method"]: row for row in result["rows"] if row["cell"] == cell}
        assert sorted(measured) == sorted(METHODS), cell
        assert measured["original"]["ratio"] == 1.0
        assert all(row["ratio"] > 0 for row in measured.values())


def test_cpu_smoke_eager_writes_every_method_row_with_originals_at_one(tmp_path):
    table, result = smoke(tmp_path / "gpu", "--batch-sizes", "2", "--geometries", "tiny", "dinov2",
                          "--dinov2", f"local-dir:{tmp_path / 'absent'}")
    check_cells(table, result, ["eager bf16 b2", "eager fp32 b2"])
    assert "not found" in result["skipped"]["dinov2"]
    assert "dinov2: skipped" in table


@pytest.mark.slow  # dynamo traces nine models, half a minute to a minute on 2 cores
def test_cpu_smoke_compiled_times_every_model_at_both_batches(tmp_path):
    table, result = smoke(tmp_path / "gpu", "--batch-sizes", "2", "4", "--runtimes", "compile", "--dtypes", "float32")
    check_cells(table, result, ["compile fp32 b2", "compile fp32 b4"])
    assert all(row["compile_s"] > 0 and row["graph_breaks"] >= 0 for row in result["rows"])


def test_without_cuda_and_without_the_smoke_flag_it_refuses(tmp_path):
    done = run_script("--out", str(tmp_path / "gpu"), hide_cuda=True)
    assert done.returncode != 0
    assert "no CUDA device" in done.stderr and "--cpu-smoke" in done.stderr
    assert not (tmp_path / "gpu").exists()
