"""Compressed models run under torch.compile and export to ONNX that ONNX Runtime runs alike."""

import pytest
import torch
from conftest import tiny_vit
from plain_vit import PlainViT, tiny_hf_vit

import vitslim
from vitslim.apps.cli import main
from vitslim.cait.compress import Cait, compress_cait
from vitslim.cait.patch import merge_schedule
from vitslim.cait.slicing import slice_channels
from vitslim.deploy import export
from vitslim.deploy.export import export_onnx, onnx_max_abs_diff
from vitslim.deploy.quantize import quantize_int8
from vitslim.errors import VitslimError
from vitslim.io.recipe import steps as recipe_steps
from vitslim.lowrank.compress import SVD, LowRank, compress_lowrank
from vitslim.methods import Inputs

# width 64 and 10 classes, like the hf and plain models beside it
EXPORT_GEOMETRY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _model(family, patch=8):
    torch.manual_seed(0)
    return {
        "timm": lambda: tiny_vit(**(EXPORT_GEOMETRY | {"patch_size": patch})),
        "hf": lambda: tiny_hf_vit(num_labels=10, hidden_size=64, intermediate_size=256, patch_size=patch),
        "torch": lambda: PlainViT(dim=64, mlp_dim=256, num_classes=10, patch_size=patch).eval(),
    }[family]()


def _calibration(size=32):
    return [torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("family", ["timm", "hf", "torch"])
def test_low_rank_model_exports_to_onnx_and_matches_onnx_runtime(family, tmp_path):
    compressed = compress_lowrank(_model(family), _calibration(), LowRank(param_ratio=0.7), progress=False)
    path = export_onnx(compressed, tmp_path / "model.onnx")
    assert path.is_file() and not list(tmp_path.glob(".*partial"))
    for batch in (1, 5):  # the batch dimension is dynamic
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        assert onnx_max_abs_diff(compressed, path, images) < 1e-4


def test_int8_low_rank_model_exports_to_onnx(tmp_path):
    compressed = quantize_int8(compress_lowrank(_model("timm"), _calibration(), SVD(param_ratio=0.5), progress=False))
    path = export_onnx(compressed, tmp_path / "int8.onnx")
    assert onnx_max_abs_diff(compressed, path, torch.randn(3, 3, 32, 32)) < 1e-4


@pytest.mark.parametrize("merge", ["atme", "tome", "row-column", "atme-lattice"])
@pytest.mark.parametrize("family", ["timm", "hf", "torch"])
def test_token_merging_model_exports_to_onnx_and_matches_onnx_runtime(family, merge, tmp_path):
    compressed = compress_cait(_model(family, patch=4), Cait(speedup=1.25, merge=merge, measure=False), Inputs())
    assert merge_schedule(compressed).merged > 0
    path = export_onnx(compressed, tmp_path / "merging.onnx")
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        assert onnx_max_abs_diff(compressed, path, images) < 1e-4


def test_channel_sliced_merging_model_exports_to_onnx(tmp_path):
    model = _model("timm", patch=4)
    generator = torch.Generator().manual_seed(0)
    slice_channels(model, masks={str(i): {"qk": torch.rand(32, generator=generator) < 0.6, "v": torch.rand(32, generator=generator) < 0.6,
                                          "mlp": torch.rand(256, generator=generator) < 0.5} for i in range(2)})
    compressed = compress_cait(model, Cait(speedup=1.2, measure=False), Inputs())
    assert compressed.blocks[0].attn.head_dim < 32 and compressed.blocks[0].mlp.fc1.out_features < 256
    path = export_onnx(compressed, tmp_path / "cait.onnx")
    assert onnx_max_abs_diff(compressed, path, torch.randn(3, 3, 32, 32, generator=generator)) < 1e-4


@pytest.mark.parametrize("merge", ["atme", "tome"])
def test_merging_on_one_channel_keys_exports_with_the_same_ties_broken(merge, tmp_path):
    """Heads pruned to one query/key channel: the cosine of one-dimensional keys is ±1, so most
    merge scores tie, and ONNX Runtime must merge the tokens PyTorch merges (an exported ATME+CDCP
    model once differed by 0.41 in its logits here)."""
    model = _model("timm", patch=4)
    slice_channels(model, masks={str(i): {"qk": torch.arange(32) == 3, "v": torch.arange(32) == 5,
                                          "mlp": torch.ones(256, dtype=torch.bool)} for i in range(2)})
    compressed = compress_cait(model, Cait(speedup=1.25, merge=merge, measure=False), Inputs())
    assert compressed.blocks[0].attn.head_dim == 1 and merge_schedule(compressed).merged > 0
    path = export_onnx(compressed, tmp_path / "ties.onnx")
    assert onnx_max_abs_diff(compressed, path, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))) < 1e-4


def test_low_rank_model_compiles_without_graph_breaks():
    compressed = compress_lowrank(_model("timm"), _calibration(), SVD(param_ratio=0.5), progress=False)
    images = torch.randn(4, 3, 32, 32)
    compiled = torch.compile(compressed, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), compressed(images), rtol=1e-4, atol=1e-5)


def test_export_to_a_folder_path_is_refused(tmp_path):
    with pytest.raises(VitslimError, match="is a folder"):
        export_onnx(_model("timm"), tmp_path)


def test_export_command_checks_the_file_and_keeps_it_only_when_it_passes(tmp_path, capsys, monkeypatch):
    """The rule bench applies too: within --tolerance, or off by float32 rounding alone (ONNX
    Runtime no further from float64 than twice PyTorch's float32 is); anything else is refused."""
    compressed = compress_cait(_model("timm", patch=4), Cait(speedup=1.25, measure=False), Inputs())
    folder = vitslim.save(compressed, tmp_path / "atme")
    target = tmp_path / "atme.onnx"
    assert main(["export", str(folder), "--onnx", str(target), "--check-images", "3"]) == 0
    assert target.is_file() and "max abs difference" in capsys.readouterr().out
    rounded = tmp_path / "rounded.onnx"
    assert main(["export", str(folder), "--onnx", str(rounded), "--tolerance", "1e-12"]) == 0
    assert rounded.is_file() and "accepted as float32 rounding" in capsys.readouterr().out
    rounded.unlink()
    onnx_and_reference = export.onnx_and_reference
    monkeypatch.setattr(export, "onnx_and_reference", lambda *args: (onnx_and_reference(*args)[0] + 0.01, onnx_and_reference(*args)[1]))
    refused = tmp_path / "refused.onnx"
    assert main(["export", str(folder), "--onnx", str(refused)]) == 2
    assert "error: --tolerance is 0.0001, but the ONNX graph's output differs from PyTorch's: max abs difference 0.01" in capsys.readouterr().err
    assert not refused.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["atme", "atme.onnx"]


def _merging_model(tied: bool):
    """A tiny ATME model; ``tied``: every key the same vector (the k projection's weight zeroed),
    so every merge decision is an exact tie that a jitter of the keys settles otherwise."""
    model = compress_cait(_model("timm", patch=4), Cait(speedup=1.25, measure=False), Inputs())
    if tied:
        qkv = model.blocks[0].attn.qkv
        width = qkv.out_features // 3
        with torch.no_grad():
            qkv.weight[width: 2 * width] = 0.0
            qkv.bias[width: 2 * width] = 1.0
    return model.eval()


def test_near_tie_images_are_those_whose_merges_flip_under_jittered_keys():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for tied, expected in ((False, [False] * 4), (True, [True] * 4)):
        model = _merging_model(tied)
        with torch.no_grad():
            reference = model(images)
        assert export.near_tie_images(model, images, reference, export.ONNX_TOLERANCE).tolist() == expected
        with torch.no_grad():  # the jitter is gone afterwards
            assert torch.equal(model(images), reference)
    assert export.near_tie_images(_model("timm", patch=4).eval(), images, reference, 1e-4) is None  # merges nothing


def test_onnx_check_leaves_out_failing_near_tie_images_but_never_most_of_them(tmp_path, monkeypatch):
    model = _merging_model(False)
    path = export_onnx(model, tmp_path / "atme.onnx")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    onnx_and_reference = export.onnx_and_reference

    def flipped_on(indices):  # ONNX Runtime "merging other tokens" on those images
        def run(*args):
            exported, reference = onnx_and_reference(*args)
            exported[indices] += 0.5
            return exported, reference
        return run

    monkeypatch.setattr(export, "onnx_and_reference", flipped_on([1]))
    monkeypatch.setattr(export, "near_tie_images", lambda *args: torch.tensor([False, True, False, False]))
    check = export.check_onnx(model, path, images, export.ONNX_TOLERANCE)
    assert check.passed and check.near_ties == 1 and check.near_tie_diff == pytest.approx(0.5, rel=1e-3)
    assert check.max_abs_diff <= export.ONNX_TOLERANCE and "1 image(s) left out as near-tie" in str(check)
    monkeypatch.setattr(export, "near_tie_images", lambda *args: torch.tensor([False, False, True, False]))  # a tie elsewhere
    assert not export.check_onnx(model, path, images, export.ONNX_TOLERANCE).passed
    # random images, where every merge is a near-tie at the jitter's scale: only the image that
    # differs is left out, and the others must still pass
    monkeypatch.setattr(export, "near_tie_images", lambda *args: torch.tensor([True, True, True, True]))
    check = export.check_onnx(model, path, images, export.ONNX_TOLERANCE)
    assert check.passed and check.near_ties == 1 and check.max_abs_diff <= export.ONNX_TOLERANCE
    monkeypatch.setattr(export, "onnx_and_reference", flipped_on([0, 1, 2]))
    monkeypatch.setattr(export, "near_tie_images", lambda *args: torch.tensor([True, True, True, False]))  # most images: refused
    check = export.check_onnx(model, path, images, export.ONNX_TOLERANCE)
    assert not check.passed and check.near_ties == 0
    monkeypatch.setattr(export, "near_tie_images", lambda *args: torch.tensor([True, True, True, True]))  # however many are tied
    assert not export.check_onnx(model, path, images, export.ONNX_TOLERANCE).passed


def test_composed_model_exports_to_onnx_and_torch_export(tmp_path):
    """Sliced channels, then low-rank factors on the sliced layers, then ATME: the three steps of
    --method lowrank+cait, in both formats."""
    from vitslim.cait.importance import importance_masks
    from vitslim.deploy.export import export_program, program_max_abs_diff

    model = _model("timm", patch=4)
    slice_channels(model, masks=importance_masks(model, 0.6))
    factorised = compress_lowrank(model, _calibration(), LowRank(param_ratio=0.7, sensitivity="none", compensation=False), progress=False)
    composed = compress_cait(factorised, Cait(speedup=1.2, measure=False), Inputs())
    assert [step["method"] for step in recipe_steps(composed)] == ["channels", "lowrank", "merging"]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert onnx_max_abs_diff(composed, export_onnx(composed, tmp_path / "composed.onnx"), images) < 1e-4
    assert program_max_abs_diff(composed, export_program(composed, tmp_path / "composed.pt2"), images) < 1e-4


@pytest.mark.parametrize("family", ["timm", "hf", "torch"])
def test_merged_low_rank_model_round_trips_through_torch_export(family, tmp_path):
    from vitslim.deploy.export import export_program, program_max_abs_diff

    factorised = compress_lowrank(_model(family, patch=4), _calibration(), SVD(param_ratio=0.6), progress=False)
    compressed = compress_cait(factorised, Cait(speedup=1.2, measure=False), Inputs())
    path = export_program(compressed, tmp_path / "model.pt2")
    for batch in (1, 4):  # the batch dimension is dynamic
        assert program_max_abs_diff(compressed, path, torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))) < 1e-5


def test_export_command_writes_both_formats_or_refuses(tmp_path, capsys):
    folder = vitslim.save(compress_cait(_model("timm", patch=4), Cait(speedup=1.25, measure=False), Inputs()), tmp_path / "atme")
    assert main(["export", str(folder), "--onnx", str(tmp_path / "m.onnx"), "--torch-export", str(tmp_path / "m.pt2"), "--check-images", "2"]) == 0
    printed = capsys.readouterr().out
    assert "ONNX Runtime vs PyTorch" in printed and "torch.export vs PyTorch" in printed
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.pt2").is_file()
    assert main(["export", str(folder)]) == 2 and "say what to write" in capsys.readouterr().err
    assert main(["export", str(folder), "--torch-export", str(tmp_path / "no.pt2"), "--tolerance", "-1"]) == 2
    assert not (tmp_path / "no.pt2").exists()


def test_quiet_exporter_hides_exporter_chatter_and_restores_the_loggers(caplog, capsys):
    import logging
    import warnings

    from vitslim.deploy.export import _quiet_exporter

    logging.getLogger("onnx_ir").setLevel(logging.NOTSET)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet_exporter():
            print("exporter progress")
            logging.getLogger("onnx_ir._convenience").warning("Attribute type is ambiguous")
            warnings.warn("torch internals", FutureWarning)
        logging.getLogger("vitslim").warning("ours still shows")
        warnings.warn("outside the exporter", FutureWarning)
    assert capsys.readouterr().out == ""
    assert [record.getMessage() for record in caplog.records] == ["ours still shows"]
    assert [str(warning.message) for warning in caught] == ["outside the exporter"]
    assert logging.getLogger("onnx_ir").level == logging.NOTSET
