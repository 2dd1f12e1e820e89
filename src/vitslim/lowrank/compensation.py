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
                        output_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) minimising ‖(X Wᵀ − X̃ (up·down)ᵀ) D‖² given H = XᵀX̃ (``cross``) and G̃ = X̃ᵀX̃,
    with D = diag(√output_weights) (the identity without weights): the truncation then keeps the
    output channels whose error costs the loss most."""
    # with G̃ = L̃L̃ᵀ: W_ls L̃ = W H G̃⁻¹ L̃ = W H L̃⁻ᵀ, so neither G̃⁻¹ nor a second factorisation is needed
    factor, inverse = whitening_factor(gram, ridge)
    whitened = weight.double() @ cross.double() @ inverse.T
    root = None
    if output_weights is not None and float(output_weights.double().mean()) > 0:  # all-zero: the loss cannot tell channels apart
        weights = output_weights.double()
        root = (weights / weights.mean()).clamp_min(OUTPUT_WEIGHT_FLOOR).sqrt()
        whitened = root[:, None] * whitened
    U, S, Vh = torch.linalg.svd(whitened, full_matrices=False)
    up, down = WhitenedSpectrum(U=U, S=S, Vh=Vh, L_inv=inverse).factors(rank)
    return (up, down) if root is None else (up / root[:, None], down)


# output weights are clamped to this fraction of their mean, so a channel no loss gradient reached
# is still fitted, only last
OUTPUT_WEIGHT_FLOOR = 1e-3


@dataclass
class PairedStats:
    """Float64 running sums over tokens of one layer's original inputs x and compressed inputs x̃."""

    tokens: int = 0
    sum_x: torch.Tensor | None = None
    sum_x_tilde: torch.Tensor | None = None
    cross: torch.Tensor | None = None  # Σ x x̃ᵀ
    gram: torch.Tensor | None = None  # Σ x̃ x̃ᵀ

    def add(self, x: torch.Tensor, x_tilde: torch.Tensor) -> None:
        # per-batch products in the activations' precision, totals in float64 (as in calibration)
        parts = (x.sum(0).double(), x_tilde.sum(0).double(), (x.T @ x_tilde).double(), (x_tilde.T @ x_tilde).double())
        if self.cross is None:
            self.sum_x, self.sum_x_tilde, self.cross, self.gram = parts
        else:
            self.sum_x += parts[0]
            self.sum_x_tilde += parts[1]
            self.cross += parts[2]
            self.gram += parts[3]
        self.tokens += x.shape[0]

    def reduce_across_ranks(self, features: int, device) -> None:
        """Sum over ``torchrun`` ranks (a rank that saw no batch contributes zeros)."""
        if self.cross is None:
            vector, matrix = (features,), (features, features)
            self.sum_x, self.sum_x_tilde, self.cross, self.gram = (torch.zeros(shape, dtype=torch.float64, device=device)
                                                                   for shape in (vector, vector, matrix, matrix))
        for total in (self.sum_x, self.sum_x_tilde, self.cross, self.gram):
            all_reduce_sum(total)
        self.tokens = int(sum_numbers(self.tokens)[0])


def compensated_layer(weight: torch.Tensor, bias: torch.Tensor | None, stats: PairedStats, rank: int, ridge: float = DEFAULT_RIDGE,
                      output_weights: torch.Tensor | None = None):
    """(up, down, bias) minimising Σ ‖D (W x + b − (up·down) x̃ − b̂)‖² over the tokens of ``stats``
    (D as in ``compensated_factors``). Without a bias there is no intercept to fit and the
    uncentred statistics are used."""
    if bias is None:
        return (*compensated_factors(weight, stats.cross, stats.gram, rank, ridge, output_weights), None)
    mean_x, mean_x_tilde = stats.sum_x / stats.tokens, stats.sum_x_tilde / stats.tokens
    cross = stats.cross - stats.tokens * torch.outer(mean_x, mean_x_tilde)
    gram = stats.gram - stats.tokens * torch.outer(mean_x_tilde, mean_x_tilde)
    up, down = compensated_factors(weight, cross, gram, rank, ridge, output_weights)
    weight = weight.double()
    return up, down, bias.double() + weight @ mean_x - up @ (down @ mean_x_tilde)


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
               output_weights: dict[str, torch.Tensor] | None = None, fraction: float = 1.0, progress: bool = True) -> None:
    """Refit the factorised layers ``names`` (in execution order) of ``compressed`` in place,
    block by block, optionally weighting each layer's output channels, on ``fraction`` of the
    tokens (``calibration.token_rows``). ``original`` is only read. Under ``torchrun`` each rank
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
        reference = copy.deepcopy(original_block.module)
        family_of(original).unpack_attention(reference, record=False)  # named as the compressed model's layers are
        prepare_for_replacement(original, part=reference)
        prefix = qualified[id(block.module)] + "."
        own = {name[len(prefix):]: compressed.get_submodule(name) for name in names if name.startswith(prefix)}
        recorded = [_run_recording(reference, {n: reference.get_submodule(n) for n in own}, call, x, fraction, index)
                    for index, call, x in zip(indices, calls, reference_hidden)]
        for relative, layer in own.items():
            stats = PairedStats()
            for index, (_, original_inputs), call, x_tilde_hidden in zip(indices, recorded, calls, hidden):
                stats.add(original_inputs.pop(relative), token_rows(_inputs_until(block.module, layer, call, x_tilde_hidden), fraction, index))
            stats.reduce_across_ranks(layer.in_features, layer.down.weight.device)
            dense = reference.get_submodule(relative)
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
