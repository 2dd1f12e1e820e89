"""A ViT inside a user's model (a dense head on a backbone), and token merging that keeps the token
grid (dense mode): compression, objectives, evaluation, save/reload and export of the whole model."""

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPRESSIBLE, tiny_vit
from torch import nn

import vitslim
import vitslim.io.recipe
from vitslim.cait.merging import unmerge
from vitslim.cait.patch import (
    apply_token_merging,
    full_maps_read,
    reads_patch_tokens,
    remove_token_merging,
    token_map,
    token_merging,
)
from vitslim.cait.schedule import MergeSchedule, schedule_for_speedup
from vitslim.measure.objective import Objective, infer_kind, objective_for

IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


class SaliencyModel(nn.Module):
    """A user's dense model: a timm ViT backbone, its patch tokens reshaped to a grid, a small
    upsampling decoder and a sigmoid, like the saliency decoder of ../shared/models/dinov2-s14."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.backbone = tiny_vit(seed, **{**COMPRESSIBLE, "num_classes": 0})
        torch.manual_seed(seed + 1)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(48, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)[:, self.backbone.num_prefix_tokens:]
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, 8, 8)
        return torch.sigmoid(F.interpolate(self.decoder(grid), size=images.shape[-2:], mode="bilinear", align_corners=False))


def _schedule(model, method="atme", speedup=1.6):
    return schedule_for_speedup(vitslim.describe(model), method, speedup)


def test_the_vit_inside_a_users_model_is_found_and_named_from_the_whole_model():
    model = SaliencyModel()
    spec = vitslim.describe(model)
    assert spec.root is model and spec.path == "backbone" and spec.model is model.backbone
    assert spec.grid_size == (8, 8) and spec.num_prefix_tokens == 1
    assert all(name.startswith("backbone.blocks.") for name in spec.linears())
    assert spec.output(IMAGES).shape == (4, 1, 32, 32)
    assert infer_kind(spec, spec.output(IMAGES)) == "map"


def test_two_vits_side_by_side_are_refused_with_their_names():
    towers = nn.ModuleDict({"image": tiny_vit(), "depth": tiny_vit()})
    with pytest.raises(vitslim.VitslimError, match="image, depth"):
        vitslim.describe(towers)


def _last_block_output(vit, schedule, **mode):
    """What leaves the last block under ``schedule``, and the token map of that pass."""
    seen = []
    with token_merging(vit, schedule, **mode):
        handle = vit.blocks[-1].register_forward_hook(lambda module, args, output: seen.append(output))
        vit(IMAGES)
        handle.remove()
        return seen[0], token_map(vit)


def _group_means(full, where):
    """The size-weighted mean of the full map over the patches each current token holds."""
    prefix = where.prefix
    patches = full[:, prefix:]
    sums = torch.zeros(full.shape[0], where.size.shape[1] - prefix, full.shape[2]).scatter_add_(
        1, where.source[..., None].expand_as(patches), patches)
    return torch.cat([full[:, :prefix], sums / where.size[:, prefix:, None]], dim=1)


@pytest.mark.parametrize("method", ["atme", "tome", "window"])
def test_dense_mode_runs_the_blocks_on_the_merged_tokens_and_keeps_each_patch_detail(method):
    """The blocks of dense mode compute what classification mode computes: averaging the full map
    over each token's patches gives the classification-mode tokens exactly. Each patch keeps what
    set it apart when it was merged, so the map is not blocky; plain unmerging (detail=False) is
    exactly the classification tokens spread over the grid."""
    vit = tiny_vit(**{**COMPRESSIBLE, "num_classes": 0})
    schedule = _schedule(vit, method, 1.25)  # window merging happens once, after block 1 of 3: at most 1.35x here
    merged, where = _last_block_output(vit, schedule, dense=False)
    full, _ = _last_block_output(vit, schedule, dense=True)
    plain, _ = _last_block_output(vit, schedule, dense=True, detail=False)
    assert merged.shape[1] < full.shape[1] == plain.shape[1] == 65
    torch.testing.assert_close(_group_means(full, where), merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, unmerge(merged, where), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, plain, atol=1e-3)
    with torch.no_grad():
        unmerged = vit.blocks[-1](vit.blocks[-2](vit.blocks[-3](vit._pos_embed(vit.patch_embed(IMAGES)))))
    assert float((full - unmerged).abs().mean()) < float((plain - unmerged).abs().mean())


def test_merged_forward_features_and_intermediates_keep_working_after_a_forward():
    """The token map restarts at the first block, so forward_features after a forward pass (which
    used to fail on the previous pass's map) and forward_intermediates both work."""
    vit = tiny_vit(**COMPRESSIBLE)
    with token_merging(vit, _schedule(vit), dense=True):
        vit(IMAGES)
        assert vit.forward_features(IMAGES).shape == (4, 65, 48)
        final, intermediates = vit.forward_intermediates(IMAGES)
        assert final.shape == (4, 65, 48) and [tuple(i.shape) for i in intermediates] == [(4, 48, 8, 8)] * 3
    with token_merging(vit, _schedule(vit), dense=False):
        vit(IMAGES)
        assert vit.forward_features(IMAGES).shape[1] < 65


def test_dense_mode_is_chosen_when_the_output_reads_patch_tokens():
    assert reads_patch_tokens(SaliencyModel())
    assert not reads_patch_tokens(tiny_vit(**COMPRESSIBLE))  # class-token pooling
    assert reads_patch_tokens(tiny_vit(**COMPRESSIBLE, global_pool="avg"))
    model = SaliencyModel()
    apply_token_merging(model, _schedule(model))
    assert model(IMAGES).shape == (4, 1, 32, 32)
    assert vitslim.io.recipe.find_step(model, "merging")["dense"] is True
    remove_token_merging(model)
    torch.testing.assert_close(model(IMAGES), SaliencyModel()(IMAGES))


def test_a_merged_dense_model_stays_close_and_merging_more_moves_it_further():
    model = SaliencyModel()
    errors = []
    with torch.no_grad():
        reference = model(IMAGES)
        for speedup in (1.3, 1.7):
            with token_merging(model, _schedule(model, speedup=speedup)):
                errors.append(float((model(IMAGES) - reference).abs().mean()))
    assert 0 < errors[0] < errors[1]


@pytest.mark.parametrize("method", ["lowrank", "cait"])
def test_a_users_model_compresses_saves_and_reloads_whole(tmp_path, method):
    model = SaliencyModel()
    if method == "lowrank":
        compressed = vitslim.compress(model, vitslim.LowRank(param_ratio=0.5), [IMAGES] * 4, calib_images=16, progress=False)
    else:
        compressed = vitslim.compress(model, "cait", [IMAGES], speedup=1.5, measure=False, progress=False)
    assert isinstance(compressed, SaliencyModel)
    assert compressed(IMAGES).shape == model(IMAGES).shape
    assert not torch.equal(compressed(IMAGES), model(IMAGES))
    folder = vitslim.save(compressed, tmp_path / "m")
    with pytest.raises(vitslim.VitslimError, match="skeleton=SaliencyModel"):
        vitslim.load_model(folder)
    with pytest.raises(vitslim.VitslimError, match="'backbone'"):
        vitslim.load_model(folder, skeleton=tiny_vit(**COMPRESSIBLE))
    reloaded = vitslim.load_model(folder, skeleton=SaliencyModel(seed=5))
    torch.testing.assert_close(reloaded(IMAGES), compressed(IMAGES), atol=1e-5, rtol=1e-5)


def test_the_objective_follows_the_output_and_can_be_set():
    model = SaliencyModel()
    spec = vitslim.describe(model)
    assert objective_for(spec, spec.output(IMAGES)).kind == "map"
    classifier = tiny_vit(**COMPRESSIBLE)
    assert objective_for(vitslim.describe(classifier), classifier(IMAGES)).kind == "logits"
    features = tiny_vit(**{**COMPRESSIBLE, "num_classes": 0})
    assert objective_for(vitslim.describe(features), features(IMAGES)).kind == "features"
    with pytest.raises(vitslim.VitslimError, match="objective"):
        vitslim.compress(model, "lowrank", [IMAGES], param_ratio=0.5, objective="pixels", progress=False)
    same = Objective("map").per_image(model(IMAGES), model(IMAGES))
    assert same.shape == (4,) and float(same.abs().max()) == 0


def test_distillation_of_a_dense_model_fits_its_maps():
    original = SaliencyModel()
    images = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    plain = vitslim.compress(original, "svd", images, param_ratio=0.4, progress=False)
    recovered = vitslim.compress(original, "svd", images, param_ratio=0.4, progress=False,
                                 recovery=vitslim.Training(epochs=3, lr=3e-4, batch_size=4, progress=False))

    def error(model):
        with torch.no_grad():
            return sum(float((model(batch) - original(batch)).square().mean()) for batch in images)

    assert error(recovered) < error(plain)


def test_evaluate_scores_a_dense_model_by_fidelity_to_its_teacher(tiny_image_folder):
    model = SaliencyModel()
    with pytest.raises(vitslim.VitslimError, match="teacher"):
        vitslim.evaluate(model, tiny_image_folder, progress=False)
    same = vitslim.evaluate(model, tiny_image_folder, teacher=SaliencyModel(), progress=False)
    assert same["pearson"] == pytest.approx(1.0) and same["iou"] == pytest.approx(1.0) and same["mae"] == pytest.approx(0.0, abs=1e-7)
    assert "top1" not in same and same["images"] == 12
    merged = vitslim.compress(model, "cait", [IMAGES], speedup=1.7, measure=False, progress=False)
    result = vitslim.evaluate(merged, tiny_image_folder, teacher=model, threshold=0.5, progress=False)
    assert 0 < result["mae"] and result["pearson"] < 1 and result["threshold"] == 0.5


@pytest.mark.parametrize("full_map_after", [None, ()])
def test_a_merged_dense_model_exports_to_onnx_and_runs_in_onnx_runtime(tmp_path, full_map_after):
    """Every block handing on the full map, or only the last: the graph computes what PyTorch does,
    and the second has fewer gathers and scatters."""
    pytest.importorskip("onnxruntime")
    import onnx

    from vitslim.deploy.export import export_onnx, onnx_max_abs_diff

    model = SaliencyModel()
    apply_token_merging(model, _schedule(model), full_map_after=full_map_after)
    path = export_onnx(model, tmp_path / "saliency.onnx")
    assert onnx_max_abs_diff(model, path, torch.randn(3, 3, 32, 32)) < 1e-4
    if full_map_after == ():
        everywhere = SaliencyModel()
        apply_token_merging(everywhere, _schedule(everywhere))
        count = lambda graph_path: sum(node.op_type in ("Gather", "GatherElements", "ScatterElements", "ScatterND")  # noqa: E731
                                       for node in onnx.load(str(graph_path)).graph.node)
        assert count(path) < count(export_onnx(everywhere, tmp_path / "everywhere.onnx"))


def test_old_merging_steps_reload_in_classification_mode():
    vit = tiny_vit(**COMPRESSIBLE)
    step = {"method": "merging", "schedule": MergeSchedule("atme", ((0, 16, 1),)).as_dict()}
    vitslim.io.recipe.rebuild(vit, step, None)
    assert vit.forward_features(IMAGES).shape[1] == 65 - 16


def test_a_timm_feature_extractor_compresses_from_the_cli_and_is_scored_on_its_features(tmp_path, tiny_image_folder, capsys):
    """num_classes=0: the output is pooled features, so the objective and the evaluation are
    the features' (relative MSE; cosine, Pearson r), not logits."""
    import json

    from vitslim.apps.cli import main

    original = vitslim.save(tiny_vit(**{**COMPRESSIBLE, "num_classes": 0, "img_size": 40}), tmp_path / "features")
    assert main(["compress", str(original), "--data", str(tiny_image_folder), "--method", "cait", "--speedup", "1.5", "--plan-only",
                 "--calib-images", "8", "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "merged"), "--data", str(tiny_image_folder), "--teacher", str(original), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "top1" not in result and "agreement" not in result
    assert 0.5 < result["cosine"] < 1 and 0 < result["relative_mse"] and result["images"] == 12


def test_distillation_of_a_users_model_leaves_its_head_alone():
    """Recovery refits the compressed ViT; the user's head keeps its weights and batch-norm statistics."""
    original = SaliencyModel()
    original.decoder = nn.Sequential(nn.ConvTranspose2d(48, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 1, 1)).eval()
    compressed = vitslim.compress(original, "svd", [IMAGES], param_ratio=0.5, progress=False)
    head = {name: value.clone() for name, value in compressed.decoder.state_dict().items()}
    vitslim.distill(compressed, original, [IMAGES] * 2, vitslim.Training(epochs=1, lr=1e-3, batch_size=4, progress=False))
    assert all(torch.equal(head[name], value) for name, value in compressed.decoder.state_dict().items())
    assert not torch.equal(compressed.backbone.norm.weight, original.backbone.norm.weight)


class IntermediateReader(nn.Module):
    """A user's model that reads an intermediate block's map (as a feature pyramid does): timm's
    ``forward_intermediates`` on block 1, then the final map."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.backbone = tiny_vit(seed, **{**COMPRESSIBLE, "num_classes": 0})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        final, intermediates = self.backbone.forward_intermediates(images, indices=[1], output_fmt="NLC")
        return final[:, self.backbone.num_prefix_tokens:] + intermediates[0]


@pytest.mark.parametrize("method", ["atme", "tome", "window"])
def test_dense_mode_that_hands_the_full_map_on_only_at_the_end_computes_the_same(method, tmp_path):
    """Blocks whose full map nobody reads hand their merged tokens straight on: the same output to
    float rounding, the same token map, fewer hooks (no gather and scatter per block), a recipe that
    reloads to the same model."""
    model = SaliencyModel()
    schedule = _schedule(model, method, 1.25 if method == "window" else 1.6)  # window merging: at most 1.35x here
    with torch.no_grad(), token_merging(model, schedule, dense=True):
        expected = model(IMAGES)
    assert full_maps_read(model, schedule) == ()
    with torch.no_grad(), token_merging(model, schedule, dense=True, full_map_after=()):
        lazy = model(IMAGES)
        lazy_map = token_map(model)
        handles = len(model.vitslim_merging.handles)
    with token_merging(model, schedule, dense=True):
        assert handles < len(model.vitslim_merging.handles)
    torch.testing.assert_close(lazy, expected, rtol=1e-4, atol=1e-5)
    assert lazy_map is not None and lazy_map.merged
    apply_token_merging(model, schedule, dense=True, full_map_after=())
    assert vitslim.io.recipe.find_step(model, "merging")["full_map_after"] == []
    reloaded = vitslim.load_model(vitslim.save(model, tmp_path / "lazy"), skeleton=SaliencyModel(seed=5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IMAGES), model(IMAGES), rtol=0, atol=0)


def test_a_model_that_reads_an_intermediate_map_keeps_the_full_map_after_every_block():
    model = IntermediateReader()
    schedule = _schedule(model, "atme", 1.6)
    assert full_maps_read(model, schedule) is None
    # a bare ViT: its callers choose at call time what to read (forward_intermediates), so every block
    bare = tiny_vit(0, **{**COMPRESSIBLE, "num_classes": 0})
    assert full_maps_read(bare, _schedule(bare, "atme", 1.6)) is None


def test_cait_on_a_dense_model_hands_the_full_map_on_only_where_it_is_read():
    from vitslim.cait.compress import Cait, compress_cait
    from vitslim.methods import Inputs

    last_only = compress_cait(SaliencyModel(), Cait(speedup=1.5, measure=False), Inputs(progress=False))
    assert vitslim.io.recipe.find_step(last_only, "merging")["full_map_after"] == []
    everywhere = compress_cait(IntermediateReader(), Cait(speedup=1.5, measure=False), Inputs(progress=False))
    step = vitslim.io.recipe.find_step(everywhere, "merging")
    assert step["dense"] and "full_map_after" not in step


def test_near_ties_are_found_on_the_backbone_of_a_merged_users_model_alone():
    """The merger sits on the user's model; the ONNX check of the backbone part alone must still
    jitter its keys (``jittered_merge_keys``), and removing the merging takes that away too."""
    from vitslim.cait.patch import VIT_MERGER_ATTR, jittered_merge_keys
    from vitslim.deploy.export import near_tie_images

    model = SaliencyModel().eval()
    qkv = model.backbone.blocks[0].attn.qkv
    width = qkv.out_features // 3
    with torch.no_grad():  # every key alike: each merge decision is an exact tie
        qkv.weight[width: 2 * width] = 0.0
        qkv.bias[width: 2 * width] = 1.0
    apply_token_merging(model, _schedule(model), full_map_after=())
    with torch.no_grad():
        features = vitslim.describe(model.backbone).output(IMAGES)
    assert near_tie_images(model.backbone, IMAGES, features, 1e-4).all()
    remove_token_merging(model)
    assert not hasattr(model.backbone, VIT_MERGER_ATTR)
    with jittered_merge_keys(model.backbone, 1e-4) as merges:
        assert not merges
