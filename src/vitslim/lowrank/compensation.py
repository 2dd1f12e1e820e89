"""Layer-wise error compensation: refit each factorised layer to what the compressed prefix feeds it.

**Stated** (arXiv 2402.06004): a layer-wise step refines the approximation with the gradient of
each layer's output loss.

**Our reading**, and one deliberate deviation. Layers are processed in execution order; layer l
sees inputs X̃ produced by the already-compressed prefix, while its target stays the original
output Y = X Wᵀ on the original inputs X. The layer loss ‖Y − X̃ Ŵᵀ‖² over rank-r Ŵ is a
reduced-rank regression with an exact solution: with G̃ = X̃ᵀX̃ = L̃ L̃ᵀ and H = XᵀX̃, the
unconstrained minimiser is W_ls = W H G̃⁻¹ and the loss is const + ‖(W_ls − Ŵ) L̃‖², so the best
rank-r Ŵ is the whitened truncation of W_ls. We compute that global minimiser directly instead of
running gradient descent on the same loss from the principal term (which can only approach it),
so the paper's split into a principal and a gradient-trained second term collapses into one pair
of factors of the same total rank. A layer with a bias also refits it (the regression gets an intercept):
with means μ = E[x], μ̃ = E[x̃], the rank-r part fits the centred statistics and the bias absorbs
the mean shift the compressed prefix introduces, b̂ = b + W μ − Ŵ μ̃.

**Cost.** The network is replayed block by block from cached block inputs (one stream for the
original, one for the compressed model), so each block runs about twice per layer it holds,
stopping at that layer, instead of the whole network running twice per layer. Memory: the two
cached streams plus the original inputs of one block's layers, all over the calibration tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vitslim._infra.distributed import all_reduce_sum, owns, sum_numbers
from vitslim._infra.progress import Progress
from vitslim.adapters import describe, family_of, prepare_for_replacement
from vitslim.errors import ParameterError, VitslimError
from vitslim.lowrank.calibration import images_of, token_rows
from vitslim.lowrank.whitening import DEFAULT_RIDGE, WhitenedSpectrum, whitening_factor


def compensated_factors(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, rank: int, ridge: float = DEFAULT_RIDGE,
                        output_weights: torch.Tensor | None = None, shift_cross: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) minimising ‖(X Wᵀ + Δ − X̃ (up·down)ᵀ) D‖² given H = XᵀX̃ (``cross``), G̃ = X̃ᵀX̃
    and ΔᵀX̃ (``shift_cross``; Δ = 0 without it), with D = diag(√output_weights) (the identity
    without weights): the truncation then keeps the output channels whose error costs the loss
    most. Δ is a shift of the target the layer should also fit (see ``residual_gain``)."""
    # with G̃ = L̃L̃ᵀ: W_ls L̃ = (W H + ΔᵀX̃) G̃⁻¹ L̃ = (W H + ΔᵀX̃) L̃⁻ᵀ, so neither G̃⁻¹ nor a second factorisation is needed
    factor, inverse = whitening_factor(gram, ridge)
    target_cross = weight.double() @ cross.double()
    if shift_cross is not None:
        target_cross = target_cross + shift_cross.double()
    whitened = target_cross @ inverse.T
    root = output_root(output_weights)
    if root is not None:
        whitened = root[:, None] * whitened
    U, S, Vh = torch.linalg.svd(whitened, full_matrices=False)
    up, down = WhitenedSpectrum(U=U, S=S, Vh=Vh, L_inv=inverse).factors(rank)
    return (up, down) if root is None else (up / root[:, None], down)


# output weights are clamped to this fraction of their mean, so a channel no loss gradient reached
# is still fitted, only last
OUTPUT_WEIGHT_FLOOR = 1e-3


def output_root(output_weights: torch.Tensor | None) -> torch.Tensor | None:
    """√(w / mean w), floored: the diagonal D that weighs each output channel's error, in float64;
    None without weights or when they are all zero (the loss cannot tell channels apart)."""
    if output_weights is None or not float(output_weights.double().mean()) > 0:
        return None
    weights = output_weights.double()
    return (weights / weights.mean()).clamp_min(OUTPUT_WEIGHT_FLOOR).sqrt()


@dataclass
class PairedStats:
    """Float64 running sums over tokens of one layer's original inputs x and compressed inputs x̃."""

    tokens: int = 0
    sum_x: torch.Tensor | None = None
    sum_x_tilde: torch.Tensor | None = None
    cross: torch.Tensor | None = None  # Σ x x̃ᵀ
    gram: torch.Tensor | None = None  # Σ x̃ x̃ᵀ
    sum_shift: torch.Tensor | None = None  # Σ δ, when the target is shifted by δ (per token, output-sized)
    shift_cross: torch.Tensor | None = None  # Σ δ x̃ᵀ

    def add(self, x: torch.Tensor, x_tilde: torch.Tensor, shift: torch.Tensor | None = None) -> None:
        # per-batch products in the activations' precision, totals in float64 (as in calibration)
        parts = [x.sum(0).double(), x_tilde.sum(0).double(), (x.T @ x_tilde).double(), (x_tilde.T @ x_tilde).double()]
        if shift is not None:
            parts += [shift.sum(0).double(), (shift.T @ x_tilde).double()]
        names = ("sum_x", "sum_x_tilde", "cross", "gram", "sum_shift", "shift_cross")[:len(parts)]
        for name, part in zip(names, parts):
            total = getattr(self, name)
            setattr(self, name, part if total is None else total + part)
        self.tokens += x.shape[0]

    def reduce_across_ranks(self, features: int, device, outputs: int | None = None) -> None:
        """Sum over ``torchrun`` ranks (a rank that saw no batch contributes zeros; ``outputs``:
        the layer's output size, when its target is shifted)."""
        shapes = {"sum_x": (features,), "sum_x_tilde": (features,), "cross": (features, features), "gram": (features, features)}
        if outputs is not None:
            shapes.update(sum_shift=(outputs,), shift_cross=(outputs, features))
        for name, shape in shapes.items():
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(shape, dtype=torch.float64, device=device))
            all_reduce_sum(getattr(self, name))
        self.tokens = int(sum_numbers(self.tokens)[0])


def compensated_layer(weight: torch.Tensor, bias: torch.Tensor | None, stats: PairedStats, rank: int, ridge: float = DEFAULT_RIDGE,
                      output_weights: torch.Tensor | None = None):
    """(up, down, bias) minimising Σ ‖D (W x + b − (up·down) x̃ − b̂)‖² over the tokens of ``stats``
    (D as in ``compensated_factors``). Without a bias there is no intercept to fit and the
    uncentred statistics are used."""
    if bias is None:
        return (*compensated_factors(weight, stats.cross, stats.gram, rank, ridge, output_weights, stats.shift_cross), None)
    mean_x, mean_x_tilde = stats.sum_x / stats.tokens, stats.sum_x_tilde / stats.tokens
    cross = stats.cross - stats.tokens * torch.outer(mean_x, mean_x_tilde)
    gram = stats.gram - stats.tokens * torch.outer(mean_x_tilde, mean_x_tilde)
    shift_cross, mean_shift = None, 0.0
    if stats.shift_cross is not None:
        mean_shift = stats.sum_shift / stats.tokens
        shift_cross = stats.shift_cross - stats.tokens * torch.outer(mean_shift, mean_x_tilde)
    up, down = compensated_factors(weight, cross, gram, rank, ridge, output_weights, shift_cross)
    weight = weight.double()
    return up, down, bias.double() + weight @ mean_x + mean_shift - up @ (down @ mean_x_tilde)


# How a layer that writes the residual stream is refitted with ``target="block"``: it also fits
# δ_j = g_j d_j / (g_j² + λ) with λ = (SHIFT_DAMPING · rms g)², the ridge answer to how far channel
# j should move to cancel a drift d_j of the stream that reaches the block's output through g_j,
# so that channels the stream barely hears (LayerScale g_j near 0) are not asked for huge moves.
SHIFT_DAMPING = 0.1
# residual_gain's test of "output = r + g ⊙ layer(x)", relative to the layer's contribution, in
# float64: the contribution of a freshly initialised MLP is lost in float32 rounding of the stream
GAIN_TOLERANCE = 1e-6


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the input it wanted has been seen."""


def _hidden(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _first_block_calls(model: nn.Module, block: nn.Module, batches: list) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each batch passes to the first block; the prefix before it is not
    compressed, so these are the same for the original and the compressed model."""
    calls = []

    def capture(module, args, kwargs):
        if not args or not isinstance(args[0], torch.Tensor):
            raise VitslimError("compensation needs blocks that take the hidden states as their first argument")
        calls.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in batches:
            try:
                model(images_of(batch).to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


def _inputs_until(block: nn.Module, layer: nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor) -> torch.Tensor:
    """``layer``'s input (tokens × features) when ``block`` runs on ``hidden``, stopping there."""
    seen = []

    def capture(module, args):
        seen.append(args[0].reshape(-1, args[0].shape[-1]))
        raise _Stop

    handle = layer.register_forward_pre_hook(capture)
    try:
        block(hidden, *call[0][1:], **call[1])
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ParameterError("compensation", "cannot run on this model: a factorised layer was not called by its block; turn it off")
    return seen[0]


def _output_with(block: nn.Module, layer: nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor, scale: float,
                 seen: list | None = None) -> torch.Tensor:
    """``block``'s output on ``hidden`` with ``layer``'s output multiplied by ``scale`` (kept in
    ``seen`` when given)."""
    def scaled(module, args, output):
        if seen is not None:
            seen.append(output)
        return output * scale

    handle = layer.register_forward_hook(scaled)
    try:
        return _hidden(block(hidden, *call[0][1:], **call[1]))
    finally:
        handle.remove()


def _without_layer(block: nn.Module, layer: nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``block``'s output on ``hidden`` with ``layer``'s output zeroed, ``layer``'s input as
    tokens × features), from one pass."""
    seen = []

    def capture(module, args):
        seen.append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [layer.register_forward_pre_hook(capture), layer.register_forward_hook(lambda module, args, output: output * 0.0)]
    try:
        output = _hidden(block(hidden, *call[0][1:], **call[1]))
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ParameterError("compensation", "cannot run on this model: a factorised layer was not called by its block; turn it off")
    return output, seen[0]


def _one_image(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple[tuple, dict], torch.Tensor]:
    """(call, hidden) cut to the first image when nothing else in the call is a tensor (which
    could be batch-shaped): ``residual_gain``'s test is exact, so one image answers it at a
    fraction of the float64 cost."""
    others = [*call[0][1:], *call[1].values()]
    if any(isinstance(value, torch.Tensor) for value in others):
        return call, hidden
    return ((hidden[:1], *call[0][1:]), call[1]), hidden[:1]


@torch.no_grad()
def residual_gain(block: nn.Module, layer: nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor) -> torch.Tensor | None:
    """Per-channel g when ``block``'s output is r + g ⊙ layer(x), with r independent of the
    layer's output: the layer writes the residual stream, through a per-channel scale such as
    DINOv2's LayerScale (g = 1 without one). Measured by running the block with the layer's
    output kept, zeroed and doubled; None when the output is not of that form (a block that
    normalises after the add, a layer whose output goes through more work). Measured in float64
    on a copy of the block, so that the answer does not depend on rounding."""
    names = {id(module): name for name, module in block.named_modules()}
    block = copy.deepcopy(block).double()
    layer = block.get_submodule(names[id(layer)])
    call = _in_double(call)
    hidden = hidden.double()
    seen: list[torch.Tensor] = []
    kept = _output_with(block, layer, call, hidden, 1.0, seen)
    without, doubled = (_output_with(block, layer, call, hidden, scale) for scale in (0.0, 2.0))
    if not seen or kept.shape != seen[0].shape:
        return None
    contribution = (kept - without).reshape(-1, kept.shape[-1]).double()
    output = seen[0].reshape(-1, kept.shape[-1]).double()
    scale = float(contribution.norm())
    if scale == 0 or float(((doubled - kept).reshape(contribution.shape).double() - contribution).norm()) > GAIN_TOLERANCE * scale:
        return None
    gain = (contribution * output).sum(0) / output.square().sum(0).clamp_min(torch.finfo(torch.float64).tiny)
    if float((contribution - gain * output).norm()) > GAIN_TOLERANCE * scale:
        return None
    return gain


def _in_double(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    def convert(value):
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return tuple(convert(value) for value in call[0]), {key: convert(value) for key, value in call[1].items()}


def _damping(gain: torch.Tensor) -> torch.Tensor:
    """g / (g² + λ) (see ``SHIFT_DAMPING``)."""
    ridge = (SHIFT_DAMPING ** 2) * float(gain.square().mean())
    return gain / (gain.square() + ridge)


def _dense_copy(original: nn.Module, block: nn.Module) -> nn.Module:
    """A private copy of one of ``original``'s blocks, prepared like the compressed model (attention
    unpacked, so its layers are named and always called as the compressed model's are)."""
    copied = copy.deepcopy(block)
    family_of(original).unpack_attention(copied, record=False)
    prepare_for_replacement(original, part=copied)
    return copied


def _run_recording(block: nn.Module, layers: dict[str, nn.Module], call: tuple[tuple, dict], hidden: torch.Tensor, fraction: float, batch_index: int):
    """The block's output on ``hidden`` and the inputs (the ``token_rows`` subset) each of ``layers`` saw."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def capture(module, args):
            seen[name] = token_rows(args[0].reshape(-1, args[0].shape[-1]), fraction, batch_index)

        return capture

    handles = [layer.register_forward_pre_hook(keep(name)) for name, layer in layers.items()]
    try:
        output = _hidden(block(hidden, *call[0][1:], **call[1]))
    finally:
        for handle in handles:
            handle.remove()
    return output, seen


@torch.no_grad()
def compensate(original: nn.Module, compressed: nn.Module, names: list[str], batches: Iterable, *,
               output_weights: dict[str, torch.Tensor] | None = None, fraction: float = 1.0, target: str = "layer",
               progress: bool = True) -> None:
    """Refit the factorised layers ``names`` (in execution order) of ``compressed`` in place,
    block by block, optionally weighting each layer's output channels, on ``fraction`` of the
    tokens (``calibration.token_rows``). ``original`` is only read.

    ``target`` says what each layer is refitted to: "layer", its own original output; "block",
    the same, except that a layer writing the residual stream (``residual_gain``: the last one of
    a pre-norm block, fc2) also cancels the drift that the compressed prefix has left in the stream,
    so that the block's output, not only the layer's, comes back towards the original's.

    Under ``torchrun`` each rank
    replays its share of the batches (every rank is given the same ones) and the statistics of
    every layer are all-reduced before it is fitted, so all ranks fit the same factors."""
    indexed = [(index, batch) for index, batch in enumerate(batches) if owns(index)]
    indices, batches = [index for index, _ in indexed], [batch for _, batch in indexed]
    original_blocks = describe(original).blocks
    compressed_blocks = describe(compressed).blocks
    qualified = {id(module): name for name, module in compressed.named_modules()}
    calls = _first_block_calls(compressed, compressed_blocks[0].module, batches)
    reference_hidden = [call[0][0] for call in calls]
    hidden = list(reference_hidden)
    bar = Progress("compensating layers", total=len(names), unit="layer", show=progress)
    for original_block, block in zip(original_blocks, compressed_blocks):
        # a private copy, prepared like the compressed model, so its layers are always called
        reference = _dense_copy(original, original_block.module)
        prefix = qualified[id(block.module)] + "."
        own = {name[len(prefix):]: compressed.get_submodule(name) for name in names if name.startswith(prefix)}
        recorded = [_run_recording(reference, {n: reference.get_submodule(n) for n in own}, call, x, fraction, index)
                    for index, call, x in zip(indices, calls, reference_hidden)]
        for relative, layer in own.items():
            stats = PairedStats()
            dense = reference.get_submodule(relative)
            gain = None
            if target == "block" and calls and layer.out_features == reference_hidden[0].shape[-1]:  # only such a layer can write the stream
                gain = residual_gain(reference, dense, *_one_image(calls[0], reference_hidden[0]))
            for index, (reference_output, original_inputs), call, x_tilde_hidden in zip(indices, recorded, calls, hidden):
                inputs, shift = original_inputs.pop(relative), None
                if gain is None:
                    inputs_tilde = _inputs_until(block.module, layer, call, x_tilde_hidden)
                else:  # the stream's drift: the block's outputs without this layer's part, r = output − g ⊙ layer(x)
                    stream_tilde, inputs_tilde = _without_layer(block.module, layer, call, x_tilde_hidden)
                    stream = token_rows(reference_output.reshape(-1, reference_output.shape[-1]), fraction, index) - gain.to(inputs) * dense(inputs)
                    drift = stream - token_rows(stream_tilde.reshape(-1, stream.shape[-1]), fraction, index)
                    shift = drift * _damping(gain).to(drift)
                stats.add(inputs, token_rows(inputs_tilde, fraction, index), shift)
            shifted = sum_numbers(int(gain is not None))[0] > 0  # a rank given no batch measured no gain
            stats.reduce_across_ranks(layer.in_features, layer.down.weight.device, layer.out_features if shifted else None)
            up, down, bias = compensated_layer(dense.weight.detach(), None if dense.bias is None else dense.bias.detach(), stats, layer.rank,
                                               output_weights=(output_weights or {}).get(prefix + relative))
            layer.up.weight.copy_(up.to(layer.up.weight.dtype))
            layer.down.weight.copy_(down.to(layer.down.weight.dtype))
            if bias is not None:
                layer.up.bias.copy_(bias.to(layer.up.bias.dtype))
            bar.update()
        reference_hidden = [output for output, _ in recorded]
        hidden = [_hidden(block.module(x, *call[0][1:], **call[1])) for call, x in zip(calls, hidden)]
    bar.close()


def left_factor(weight: torch.Tensor, down: torch.Tensor, gram: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """The up factor U minimising Σ ‖W x − U B x‖² over the inputs x whose Gram matrix is ``gram``,
    with the down factor B = ``down`` kept: U = W G Bᵀ (B G Bᵀ + λI)⁻¹, λ = ``ridge`` · mean diag
    (float64). SVD-LLM's closed-form update (``update_left_factors``)."""
    weight, down, gram = weight.double(), down.double(), gram.double()
    projected = down @ gram @ down.T
    projected = projected + ridge * projected.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny) * torch.eye(
        projected.shape[0], dtype=projected.dtype, device=projected.device)
    return torch.linalg.solve(projected, (weight @ gram @ down.T).T).T


@torch.no_grad()
def update_left_factors(original: nn.Module, compressed: nn.Module, names: list[str], batches: Iterable, *, fraction: float = 1.0,
                        progress: bool = True) -> None:
    """SVD-LLM's layer-wise closed-form update (arXiv 2403.07378), as its released code runs it:
    block by block, each factorised layer of ``names`` sees the inputs the *dense* block gives on
    the hidden states of the compressed prefix, x̃; its target is the dense layer's output on them,
    W x̃; its down factor (the truncated whitened right singular vectors) is kept and its up factor
    becomes the least-squares ``left_factor``. Biases stay. The baseline ``svd-llm`` runs it, so
    that vitslim's own correction (``compensate``: both factors, the original output as target,
    the stream's drift) is compared with the published one on the same factors and images."""
    indexed = [(index, batch) for index, batch in enumerate(batches) if owns(index)]
    indices, batches = [index for index, _ in indexed], [batch for _, batch in indexed]
    compressed_blocks = describe(compressed).blocks
    qualified = {id(module): name for name, module in compressed.named_modules()}
    calls = _first_block_calls(compressed, compressed_blocks[0].module, batches)
    hidden = [call[0][0] for call in calls]
    bar = Progress("updating left factors (SVD-LLM)", total=len(names), unit="layer", show=progress)
    for original_block, block in zip(describe(original).blocks, compressed_blocks):
        prefix = qualified[id(block.module)] + "."
        own = {name[len(prefix):]: compressed.get_submodule(name) for name in names if name.startswith(prefix)}
        if own:
            dense_block = _dense_copy(original, original_block.module)
            grams = {relative: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=layer.down.weight.device)
                     for relative, layer in own.items()}
            for index, call, x in zip(indices, calls, hidden):
                _, seen = _run_recording(dense_block, {relative: dense_block.get_submodule(relative) for relative in own}, call, x, fraction, index)
                for relative, rows in seen.items():
                    grams[relative] += (rows.T @ rows).double()
            for relative, layer in own.items():
                up = left_factor(dense_block.get_submodule(relative).weight.detach(), layer.down.weight.detach(), all_reduce_sum(grams[relative]))
                layer.up.weight.copy_(up.to(layer.up.weight.dtype))
                bar.update()
        hidden = [_hidden(block.module(x, *call[0][1:], **call[1])) for call, x in zip(calls, hidden)]
    bar.close()
