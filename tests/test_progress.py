"""Long loops show progress: a bar on a terminal, INFO log lines (``vitslim -v``) otherwise."""

import logging

import torch
from conftest import tiny_vit

from vitslim._infra import progress
from vitslim.lowrank.compress import LowRank, compress_lowrank


def test_track_logs_the_first_item_then_every_few_items(caplog):
    caplog.set_level(logging.INFO, logger="vitslim")
    assert list(progress.track(range(250), "calibrating", unit="batch")) == list(range(250))  # pytest's stderr is no terminal
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["calibrating: batch 1/250", "calibrating: batch 101/250", "calibrating: batch 201/250"]
    assert all("ETA" in line and "/s" in line for line in lines)


def test_nothing_is_logged_when_progress_is_off(caplog):
    caplog.set_level(logging.INFO, logger="vitslim")
    list(progress.track(range(5), "calibrating", show=False))
    assert not caplog.records


def test_a_slow_loop_logs_by_time_too(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="vitslim")
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    with progress.Progress("compensating layers", total=3, unit="layer") as bar:
        for _ in range(3):
            bar.update()
    assert len(caplog.records) == 3 and caplog.records[-1].getMessage().startswith("compensating layers: layer 3/3")


def test_calibration_and_compensation_report_progress_under_verbose(caplog):
    caplog.set_level(logging.INFO, logger="vitslim")
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) for seed in range(2)]
    compress_lowrank(tiny_vit(), batches, LowRank(param_ratio=0.6))
    described = {record.getMessage().split(":")[0] for record in caplog.records}
    assert {"calibrating", "measuring layer sensitivity", "compensating layers"} <= described
