"""Low-rank compression on small real models of every family: budgets, structure, round trips, errors."""

import pytest
import torch
from conftest import tiny_vit
from plain_vit import PlainViT, tiny_hf_vit

import vitslim
from vitslim.errors import VitslimError
from vitslim.io.recipe import steps as recipe_steps
from vitslim.lowrank.compress import compress_lowrank, compressible_linears
from vitslim.lowrank.layers import LowRankLinear
from vitslim.measure.metrics import count_params
from vitslim.methods import configure

# width 64 and 10 classes, like the hf and plain models beside it
LOWRANK_GEOMETRY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _batches(count=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, size, size, generator=generator) for _ in range(count)]


def _lowrank(model, batches, *, method="lowrank", min_images=1, **settings):
    return compress_lowrank(model, batches, configure(method, **settings), min_images=min_images, progress=False)


def _models():
    torch.manual_seed(0)
    return {
        "timm": tiny_vit(**LOWRANK_GEOMETRY),
        "hf": tiny_hf_vit(num_labels=10, hidden_size=64, intermediate_size=256),
        "torch": PlainViT(dim=64, mlp_dim=256, num_classes=10).eval(),
    }


@pytest.mark.parametrize("family", ["timm", "hf", "torch"])
def test_budget_is_met_and_the_original_is_untouched(family):
    model = _models()[family]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = _lowrank(model, _batches(), param_ratio=0.6)
    target = int(0.6 * count_params(model))
    assert count_params(compressed) <= target
    assert count_params(compressed) > target - max(layer.in_features + layer.out_features for layer in compressible_linears(model).values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, LowRankLinear) for m in compressed.modules())
    with torch.no_grad():
        out = vitslim.describe(compressed).output(_batches(1)[0])
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    vitslim.describe(compressed)  # a compressed model still describes itself


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_save_and_reload_of_a_factorised_model_is_bit_identical(family, tmp_path):
    compressed = _lowrank(_models()[family], _batches(), param_ratio=0.5, rank_multiple=4)
    step = recipe_steps(compressed)[-1]
    assert step["method"] == "lowrank" and all(rank % 4 == 0 for rank in step["ranks"].values())
    reloaded = vitslim.load_model(vitslim.save(compressed, tmp_path / "out"))
    x = _batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(vitslim.describe(compressed).output(x), vitslim.describe(reloaded).output(x))
    assert count_params(reloaded) == count_params(compressed)


def test_whitened_beats_plain_svd_on_the_calibration_outputs():
    model = _models()["timm"]
    batches = _batches(6)
    with torch.no_grad():
        reference = torch.cat([model(x) for x in batches])
        errors = {}
        for method in ("lowrank", "svd"):
            compressed = _lowrank(model, batches, param_ratio=0.5, method=method, allocation="uniform")
            errors[method] = float((torch.cat([compressed(x) for x in batches]) - reference).square().mean())
    assert errors["lowrank"] < errors["svd"]


@pytest.mark.parametrize("kwargs, message", [
    ({"param_ratio": 0.0}, "between 0 and 1"),
    ({"param_ratio": 1.0}, "between 0 and 1"),
    ({"param_ratio": 0.01}, "stay dense|even rank"),
    ({"param_ratio": 0.5, "params": 10}, "both state the parameter budget"),
    ({}, "state exactly one budget"),
    ({"param_ratio": 0.5, "method": "magic"}, "not a vitslim method"),
    ({"param_ratio": 0.5, "allocation": "random"}, "choose one of mixed, uniform"),
])
def test_bad_budgets_and_options(kwargs, message):
    with pytest.raises(VitslimError, match=message):
        _lowrank(_models()["timm"], _batches(), **kwargs)


def test_too_few_calibration_images_and_non_finite_activations():
    model = _models()["timm"]
    with pytest.raises(VitslimError, match="only 8 calibration images"):
        _lowrank(model, _batches(1), param_ratio=0.5, min_images=16)
    poisoned = _batches(2)
    poisoned[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(VitslimError, match="non-finite"):
        _lowrank(model, poisoned, param_ratio=0.5)


def test_enough_calibration_images_pass_even_when_the_statistics_use_only_the_leading_ones():
    tokens = vitslim.describe(_models()["timm"]).num_patches + 1
    for settings in ({"statistics_tokens": 3 * tokens, "compensation": False}, {"allocation_tokens": 3 * tokens}):
        compressed = _lowrank(_models()["timm"], _batches(2), param_ratio=0.5, min_images=16, **settings)  # Gram matrices of 3 of 16 images
        assert count_params(compressed) < count_params(_models()["timm"])


@pytest.mark.parametrize("compensation, settings, images", [
    (True, {}, 16),  # the allocation's default cap is far above 16 tiny images
    (True, {"allocation_tokens": 3}, 3),
    (True, {"statistics_tokens": 2, "allocation_tokens": None}, 2),  # within the statistics' own cap
    (True, {"statistics_tokens": 5, "allocation_tokens": 3}, 3),
    (False, {"allocation_tokens": 3}, 16),  # without compensation the Gram matrices also give the factors: every token
    (False, {"statistics_tokens": 5}, 5),
])
def test_the_allocation_statistics_read_only_their_own_share_when_compensation_follows(monkeypatch, compensation, settings, images):
    import vitslim.lowrank.compress as compress_module

    tokens = vitslim.describe(_models()["timm"]).num_patches + 1
    seen, collect = [], compress_module.collect_grams

    def counting(model, linears, batches, **kwargs):
        seen.append(sum(batch.shape[0] for batch in batches))
        return collect(model, linears, batches, **kwargs)

    monkeypatch.setattr(compress_module, "collect_grams", counting)
    scaled = {key: None if value is None else value * tokens for key, value in settings.items()}
    calls = []
    monkeypatch.setattr(compress_module, "compensate", lambda *args, **kwargs: calls.append(kwargs["fraction"]))
    _lowrank(_models()["timm"], _batches(2), param_ratio=0.5, compensation=compensation, **scaled)
    assert seen == [images]
    if compensation:  # compensation itself keeps the statistics' cap: 5 of 16 images' tokens, or all of them
        assert calls == [pytest.approx(min(1.0, (settings.get("statistics_tokens") or 10 ** 9) / 16))]


def test_a_model_with_no_compressible_layer_is_refused():
    model = _models()["timm"]
    with pytest.raises(VitslimError, match="no compressible"):
        _lowrank(_lowrank(model, _batches(), param_ratio=0.2), _batches(), param_ratio=0.1)


def test_plain_torch_factorised_model_reloads_into_its_skeleton(tmp_path):
    compressed = _lowrank(_models()["torch"], _batches(), param_ratio=0.6)
    folder = vitslim.save(compressed, tmp_path / "plain")
    reloaded = vitslim.load_model(folder, skeleton=PlainViT(dim=64, mlp_dim=256, num_classes=10))
    x = _batches(1, seed=4)[0]
    with torch.no_grad():
        assert torch.equal(compressed(x), reloaded(x))
    assert isinstance(reloaded.encoder.layers[0].linear1, LowRankLinear) or isinstance(reloaded.encoder.layers[0].linear2, LowRankLinear)


def test_a_factorised_folder_reloads_in_a_fresh_process(tmp_path):
    """The rebuild function must register itself without the caller importing vitslim.lowrank."""
    import subprocess
    import sys

    folder = vitslim.save(_lowrank(_models()["timm"], _batches(), param_ratio=0.5), tmp_path / "out")
    code = f"import vitslim; m = vitslim.load_model({str(folder)!r}); print(type(m.blocks[0].attn.qkv).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "LowRankLinear"


def test_fisher_sensitivity_is_zero_where_the_output_cannot_matter():
    """A block whose MLP output is scaled by a zero LayerScale cannot affect the loss: its fc2 gets
    zero sensitivity, so mixed allocation gives it the minimum rank and spends elsewhere."""
    from vitslim.lowrank.sensitivity import fisher_channels

    model = tiny_vit(**LOWRANK_GEOMETRY, init_values=1.0)
    with torch.no_grad():
        model.blocks[1].ls2.gamma.zero_()
    linears = compressible_linears(model)
    weights = {name: float(values.mean()) for name, values in fisher_channels(model, linears, _batches(), progress=False).items()}
    assert weights["blocks.1.mlp.fc2"] == 0.0 and weights["blocks.1.mlp.fc1"] == 0.0
    assert all(w > 0 for n, w in weights.items() if not n.startswith("blocks.1.mlp"))
    compressed = _lowrank(model, _batches(), param_ratio=0.6, rank_multiple=2)
    ranks = recipe_steps(compressed)[-1]["ranks"]
    assert ranks["blocks.1.mlp.fc2"] == 2 and ranks["blocks.1.mlp.fc1"] == 2


def test_fisher_needs_no_trainable_parameters():
    model = _models()["timm"]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    compressed = _lowrank(model, _batches(), param_ratio=0.6)
    assert recipe_steps(compressed)[-1]["sensitivity"] == "fisher"


def test_fisher_is_refused_for_the_baselines():
    with pytest.raises(VitslimError, match="only the whitened"):
        _lowrank(_models()["timm"], _batches(), param_ratio=0.6, method="svd", sensitivity="fisher")


@pytest.mark.parametrize("method, kwargs", [("svd", {}), ("svd-llm", {}), ("lowrank", {"compensation": False})])
def test_a_compensation_target_without_compensation_is_refused_not_ignored(method, kwargs):
    with pytest.raises(VitslimError, match=f"compensation_target chooses what compensation refits, and {method} runs without"):
        _lowrank(_models()["timm"], _batches(), param_ratio=0.6, method=method, compensation_target="auto", **kwargs)


def test_compensation_lowers_the_error_of_the_compressed_model():
    model = _models()["timm"]
    batches = _batches(6)
    with torch.no_grad():
        reference = torch.cat([model(x) for x in batches])
        error = {}
        for compensation in (False, True):
            compressed = _lowrank(model, batches, param_ratio=0.4, compensation=compensation)
            error[compensation] = float((torch.cat([compressed(x) for x in batches]) - reference).square().mean())
    assert error[True] < error[False]
    assert recipe_steps(compressed)[-1]["compensation"] is True


def _compensate_by_whole_forwards(original, compressed, names, batches):
    """Brute-force reference: for each layer, two whole-network forwards give its paired inputs."""
    from vitslim.lowrank.compensation import PairedStats, compensated_layer

    for name in names:
        seen = {}
        handles = [original.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].reshape(-1, a[0].shape[-1]))),
                   compressed.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.__setitem__("xt", a[0].reshape(-1, a[0].shape[-1])))]
        stats = PairedStats()
        with torch.no_grad():
            for x in batches:
                original(x)
                compressed(x)
                stats.add(seen["x"], seen["xt"])
        for handle in handles:
            handle.remove()
        layer, dense = compressed.get_submodule(name), original.get_submodule(name)
        up, down, bias = compensated_layer(dense.weight.detach(), dense.bias.detach(), stats, layer.rank)
        with torch.no_grad():
            layer.up.weight.copy_(up.float())
            layer.down.weight.copy_(down.float())
            layer.up.bias.copy_(bias.float())


@pytest.mark.parametrize("family", ["timm", "hf", "torch"])
def test_block_cached_compensation_equals_whole_network_replay(family):
    model = _models()[family]
    batches = _batches(3)
    ratio = 0.4
    principal = _lowrank(model, batches, param_ratio=ratio, compensation=False, sensitivity="none")
    names = list(recipe_steps(principal)[-1]["ranks"])
    fast = _lowrank(model, batches, param_ratio=ratio, compensation=True, sensitivity="none", compensation_target="layer")
    assert list(recipe_steps(fast)[-1]["ranks"]) == names
    with torch.no_grad():
        uncompensated = vitslim.describe(principal).output(batches[0])
    vitslim.adapters.family_of(model).unpack_attention(model)  # torch: named as the compressed model's layers are
    vitslim.adapters.prepare_for_replacement(model)  # the reference hooks need the layers called
    _compensate_by_whole_forwards(model, principal, names, batches)
    # the factors differ by float32 rounding amplified by ill-conditioned Gram matrices (and by
    # singular-vector signs), so the test compares what the models compute
    with torch.no_grad():
        fast_logits, slow_logits = vitslim.describe(fast).output(batches[0]), vitslim.describe(principal).output(batches[0])
    assert (slow_logits - uncompensated).abs().max() > 100 * 1e-4  # compensation moved the outputs
    torch.testing.assert_close(fast_logits, slow_logits, rtol=0, atol=1e-4)


def test_leading_images_take_the_first_images_across_batches_and_pass_over_unreadable_ones():
    from vitslim.io.image_batches import leading_images

    first, second = torch.randn(3, 3, 8, 8), torch.randn(4, 3, 8, 8)
    batches = [(first, torch.zeros(3), 0), (None, torch.zeros(0), 2), (second, torch.zeros(4), 0)]
    taken = leading_images(batches, 5)
    assert [len(b) for b in taken] == [3, 2]
    assert torch.equal(torch.cat(taken), torch.cat([first, second])[:5])
    assert [len(b) for b in leading_images([first, second], 100)] == [3, 4]  # fewer when they run out
    assert leading_images([first], 0) == []


def test_residual_gain_finds_the_layer_that_writes_the_stream_and_its_layer_scale():
    from vitslim.lowrank.compensation import residual_gain

    model = tiny_vit(**LOWRANK_GEOMETRY, init_values=0.5)
    block = model.blocks[0]
    with torch.no_grad():
        block.ls2.gamma.copy_(torch.linspace(0.01, 2.0, 64))
        tokens = model.patch_embed(_batches(1)[0])
    call = ((tokens,), {})
    torch.testing.assert_close(residual_gain(block, block.mlp.fc2, call, tokens).float(), block.ls2.gamma.detach(), rtol=1e-3, atol=1e-4)
    assert residual_gain(block, block.mlp.fc1, call, tokens) is None  # an activation and fc2 follow it
    assert residual_gain(block, block.attn.proj, call, tokens) is None  # the MLP reads its output
    layers = {}
    for norm_first in (True, False):
        plain = PlainViT(dim=64, mlp_dim=256, norm_first=norm_first).eval()
        vitslim.adapters.prepare_for_replacement(plain)  # torch's fused encoder kernel would bypass the Linears' hooks
        layers[norm_first] = plain.encoder.layers[0]
    pre_norm, post_norm = layers[True], layers[False]
    torch.testing.assert_close(residual_gain(pre_norm, pre_norm.linear2, call, tokens).float(), torch.ones(64), rtol=1e-3, atol=1e-4)
    assert residual_gain(post_norm, post_norm.linear2, call, tokens) is None  # normalises after the add


def test_block_target_brings_the_blocks_outputs_closer_than_the_layer_target():
    """Refitting fc2 to the block's output (cancelling the stream's drift) lowers the last
    block's output error on the calibration images, with and without a LayerScale."""
    for init_values in (None, 0.3):
        model = tiny_vit(**{**LOWRANK_GEOMETRY, "depth": 3}, **({"init_values": init_values} if init_values else {}))
        batches = _batches(6)
        with torch.no_grad():
            reference = torch.cat([model.forward_features(x) for x in batches])
            error = {}
            for target in ("layer", "block"):
                compressed = _lowrank(model, batches, param_ratio=0.4, sensitivity="none", compensation_target=target)
                error[target] = float((torch.cat([compressed.forward_features(x) for x in batches]) - reference).square().mean())
        assert error["block"] < error["layer"], init_values
    assert recipe_steps(compressed)[-1]["compensation_target"] == "block"


def test_auto_target_keeps_the_target_closer_on_held_out_images_then_refits_it_on_all():
    """compensation_target="auto": each target is fitted on the calibration images but every 4th
    and scored by KL to the original on those; the recorded scores equal a brute-force compression
    on the fitting images alone (uniform ranks and no sensitivity make the ranks data-free), the
    lower one wins, and the result is the winner refitted on every image."""
    model = tiny_vit(**{**LOWRANK_GEOMETRY, "depth": 3})
    batches = _batches(4)
    settings = dict(param_ratio=0.4, sensitivity="none", allocation="uniform")
    chosen = _lowrank(model, batches, compensation_target="auto", **settings)
    step = recipe_steps(chosen)[-1]
    scores = step["compensation_target_scores"]
    images = torch.cat(batches)
    held = torch.arange(images.shape[0]) % 4 == 3
    fitting, held_out = list(images[~held].split(8)), images[held]
    with torch.no_grad():
        log_reference = torch.log_softmax(model(held_out), -1)
        for target in ("block", "layer"):
            log_candidate = torch.log_softmax(_lowrank(model, fitting, compensation_target=target, **settings)(held_out), -1)
            kl = (log_reference.exp() * (log_reference - log_candidate)).sum(-1).mean()
            assert scores[target] == pytest.approx(float(kl), rel=1e-3, abs=1e-7), target
    assert step["compensation_target"] == min(scores, key=scores.get)
    refitted = _lowrank(model, batches, compensation_target=step["compensation_target"], **settings)
    for (name, value), (_, expected) in zip(chosen.state_dict().items(), refitted.state_dict().items()):
        torch.testing.assert_close(value, expected, msg=name)


def test_auto_target_needs_images_to_hold_out():
    with pytest.raises(VitslimError, match="at least 4"):
        _lowrank(tiny_vit(**LOWRANK_GEOMETRY), [torch.randn(3, 3, 32, 32)], param_ratio=0.4, sensitivity="none", compensation_target="auto")


def test_svd_llm_baseline_uses_uniform_ranks_and_refits_up_factors_to_the_compressed_prefix():
    """The SVD-LLM peer: whitened factors at the same share of every matrix, then each up factor
    is the least-squares fit of W x̃ on B x̃, x̃ being what the dense block gives on the compressed
    prefix's hidden states (checked against a brute-force replay for a layer of the second block)."""
    model = _models()["timm"]
    batches = _batches(6)
    peer = _lowrank(model, batches, param_ratio=0.5, method="svd-llm")
    plain = _lowrank(model, batches, param_ratio=0.5, method="lowrank", allocation="uniform", sensitivity="none", compensation=False)
    step, plain_step = recipe_steps(peer)[-1], recipe_steps(plain)[-1]
    assert step["ranks"] == plain_step["ranks"] and step["allocation"] == "uniform" and step["update"] == "svd-llm left factor"
    assert step["sensitivity"] == "none" and not step["compensation"]
    assert count_params(peer) <= int(0.5 * count_params(model))
    for name, module in peer.named_modules():
        if isinstance(module, LowRankLinear):  # only the up factors move
            torch.testing.assert_close(module.down.weight, plain.get_submodule(name).down.weight)
    hidden, inputs = [], []
    capture = peer.blocks[1].register_forward_pre_hook(lambda module, args: hidden.append(args[0]))
    record = model.blocks[1].mlp.fc1.register_forward_pre_hook(lambda module, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in batches:
            peer(batch)
        for x in hidden:
            model.blocks[1](x)
    capture.remove()
    record.remove()
    x_tilde = torch.cat(inputs).double()
    down = peer.blocks[1].mlp.fc1.down.weight.double()
    expected = torch.linalg.lstsq(x_tilde @ down.T, x_tilde @ model.blocks[1].mlp.fc1.weight.double().T).solution.T
    torch.testing.assert_close(peer.blocks[1].mlp.fc1.up.weight.double(), expected, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(peer.blocks[1].mlp.fc1.up.weight, plain.blocks[1].mlp.fc1.up.weight, atol=1e-4)
    with pytest.raises(Exception, match="SVD-LLM"):
        configure("svd-llm", param_ratio=0.5, compensation=True)
