"""The demo is the README's first command: it must run offline and produce its table and report."""

import pytest

from vitslim.apps.cli import main
from vitslim.apps.demo import run_demo
from vitslim.errors import VitslimError


@pytest.mark.slow
def test_demo_runs_offline_and_writes_its_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITSLIM_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "original" in out and "saved + reloaded" in out and "top-1" in out
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| original |" in report and "tradeoff.png" in report
    assert (tmp_path / "report" / "tradeoff.png").stat().st_size > 10_000
    rows = run_demo(tmp_path / "again")  # second run reuses the cached model
    assert rows[0]["top1"] > 0.9, "the demo ViT should learn the digits"
    assert rows[1]["top1"] == rows[0]["top1"] and rows[1]["agreement"] == 1.0
    by_name = {row["name"]: row for row in rows}
    assert by_name["low-rank 50%"]["params"] <= 0.5 * rows[0]["params"]
    assert by_name["low-rank 30%"]["params"] <= 0.3 * rows[0]["params"]
    assert by_name["CAIT ATME"]["flops"] < 0.8 * rows[0]["flops"] and by_name["CAIT ATME"]["agreement"] > 0.8
    composed = by_name["low-rank + ATME"]
    assert composed["params"] <= 0.5 * rows[0]["params"] and composed["flops"] < 0.5 * rows[0]["flops"] and composed["agreement"] > 0.8


def test_demo_refuses_a_file_as_output(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(VitslimError, match="is a file"):
        run_demo(tmp_path / "taken")


def test_demo_never_replaces_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(VitslimError, match="other content"):
        run_demo(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep"
