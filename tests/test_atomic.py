"""atomic_file: a whole file or nothing, with the target's suffix kept on the temporary name."""

import pytest

from vitslim._infra.atomic import atomic_file


def test_a_failed_write_leaves_the_previous_file_and_no_partial(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")

    def fail(partial):
        partial.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_file(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_the_temporary_name_keeps_the_suffix_and_missing_folders_are_made(tmp_path):
    seen = []
    target = atomic_file(tmp_path / "deep" / "plot.png", lambda partial: seen.append(partial.suffix) or partial.write_bytes(b"png"))
    assert seen == [".png"] and target.read_bytes() == b"png" and [p.name for p in target.parent.iterdir()] == ["plot.png"]
