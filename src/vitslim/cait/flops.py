"""The FLOPs model of a block's matmuls, one for the merge planner and the channel gates.

The planner turns a target speed-up into merge counts with it before anything is measured
(``schedule.predicted_speedup``), and the gates' budget penalty prices with it the model that
``slice_channels`` would make (``ChannelGates.flops_ratio``); counting the two ways alike is what
lets the split of a speed-up between tokens and channels add up. Only matmuls are counted, 2
FLOPs per multiply-add: a block's linear layers run once per token and its attention logits and
weighted sum once per token pair, so merging tokens saves on both, and pruning channels saves in
proportion to the widths. Norms, activations, softmax and biases are small next to them.
"""

from __future__ import annotations

from vitslim.adapters.base import BlockSpec, ViTSpec


def linear_flops(in_features, out_features, rank: int | None = None):
    """FLOPs of a Linear on one token; a low-rank one (``rank``) runs two thin matmuls instead."""
    return 2 * rank * (in_features + out_features) if rank else 2 * in_features * out_features


def block_flops(tokens: int, linear, attention_channels):
    """One block's matmul FLOPs on ``tokens`` tokens: ``linear``, its linear layers' FLOPs per
    token (``linear_flops`` summed), on every token, and the attention logits and weighted sum,
    ``attention_channels`` (heads × per-head width) wide, on every token pair.

    Ints when planning; the channel gates pass widths that are tensors, so their estimate stays
    differentiable."""
    return linear * tokens + 2 * 2 * attention_channels * tokens * tokens


def _layer_flops(layer) -> int:
    return linear_flops(layer.in_features, layer.out_features, getattr(layer, "rank", None))  # rank: a LowRankLinear


def _block_linear_flops(block: BlockSpec) -> int:
    """The block's linear layers' FLOPs per token, from the layers as they are (sliced, factorised)."""
    attention = block.attention
    if attention.layout == "qkv":
        projections = _layer_flops(attention.qkv)
    elif attention.layout == "separate":
        projections = sum(_layer_flops(layer) for layer in (attention.q, attention.k, attention.v))
    else:
        projections = 2 * attention.packed.in_proj_weight.numel()
    return projections + _layer_flops(attention.out_proj) + _layer_flops(block.mlp.fc1) + _layer_flops(block.mlp.fc2)


def blocks_flops(spec: ViTSpec, tokens: list[int]) -> int:
    """The blocks' matmul FLOPs when block ``b`` processes ``tokens[b]`` tokens."""
    return sum(block_flops(n, _block_linear_flops(block), block.attention.num_heads * block.attention.head_dim)
               for block, n in zip(spec.blocks, tokens))
