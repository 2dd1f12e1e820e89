"""The Torch-Pruning peer of the benchmarks (benchmarks/peers.py) on a tiny timm ViT: the blocks
shrink, the model's interfaces and residual width do not, and the attention keeps its scale."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit

pytest.importorskip("torch_pruning")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def peers():
    """benchmarks/peers.py, imported as the benchmark scripts import their siblings."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("peers")
    finally:
        sys.path.remove(str(BENCHMARKS))


def images(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def param_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_half_the_block_channels_go_and_the_interfaces_stay(peers):
    original = tiny_vit(init_values=0.1)  # LayerScale, whose gamma spans the residual width
    before = {name: parameter.clone() for name, parameter in original.state_dict().items()}
    x = images()
    pruned = peers.prune_with_torch_pruning(original, 0.5, x)

    for block, pruned_block in zip(original.blocks, pruned.blocks):
        attention, pruned_attention = block.attn, pruned_block.attn
        assert pruned_attention.num_heads == attention.num_heads
        assert pruned_attention.head_dim == attention.head_dim // 2
        assert pruned_attention.attn_dim == pruned_attention.num_heads * pruned_attention.head_dim
        assert pruned_attention.scale == pruned_attention.head_dim**-0.5
        assert pruned_attention.qkv.weight.shape == (3 * pruned_attention.attn_dim, 32)
        assert pruned_attention.proj.weight.shape == (32, pruned_attention.attn_dim)
        assert pruned_block.mlp.fc1.weight.shape == (block.mlp.fc1.out_features // 2, 32)
        assert pruned_block.mlp.fc2.weight.shape == (32, block.mlp.fc1.out_features // 2)
        assert pruned_block.ls1.gamma.shape == pruned_block.ls2.gamma.shape == (32,)
    assert pruned.patch_embed.proj.weight.shape == original.patch_embed.proj.weight.shape
    assert pruned.head.weight.shape == original.head.weight.shape
    assert param_count(pruned) < param_count(original)
    with torch.no_grad():
        assert pruned(x).shape == original(x).shape
        assert pruned.forward_features(x).shape == original.forward_features(x).shape
    assert all(torch.equal(before[name], value) for name, value in original.state_dict().items())


def test_pruning_channels_that_do_nothing_leaves_the_outputs(peers):
    """Zero the second half of every head's query, key and value dimensions and of every MLP's
    hidden channels: L2 pruning must remove exactly those, and the outputs must not move, which
    holds only if queries, keys and values lose the same dimensions and the attention scale is
    the original one."""
    model = tiny_vit(init_values=0.1)
    with torch.no_grad():
        for block in model.blocks:
            attention = block.attn
            attention.qkv.weight.mul_(25)  # peaked attention, which a wrong scale would visibly change
            silent = torch.zeros(attention.num_heads, attention.head_dim, dtype=torch.bool)
            silent[:, attention.head_dim // 2:] = True
            rows = silent.flatten().repeat(3)  # queries, keys, values
            attention.qkv.weight[rows] = 0
            attention.qkv.bias[rows] = 0
            attention.proj.weight[:, silent.flatten()] = 0
            hidden = block.mlp.fc1.out_features
            block.mlp.fc1.weight[hidden // 2:] = 0
            block.mlp.fc1.bias[hidden // 2:] = 0
            block.mlp.fc2.weight[:, hidden // 2:] = 0
    x = images()
    pruned = peers.prune_with_torch_pruning(model, 0.5, x, importance="l2")
    assert pruned.blocks[0].attn.head_dim == model.blocks[0].attn.head_dim // 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)


def test_bisection_reaches_the_target_speedup(peers):
    """With the parameter ratio standing in for the timed speed-up (deterministic and fast)."""
    original = tiny_vit()
    measure = lambda reference, candidate: param_count(reference) / param_count(candidate)  # noqa: E731
    pruned, measured, keep_ratio = peers.prune_to_speedup(original, 1.6, images(2), measure=measure, round_to=1)
    assert measured == pytest.approx(1.6, rel=peers.TOLERANCE)
    assert measured == measure(original, pruned)
    assert 0 < keep_ratio < 1
