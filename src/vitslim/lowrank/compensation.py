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
of factors of the same total rank.

**Cost.** The network is replayed block by block from cached block inputs (one stream for the
original, one for the compressed model), so each block runs about twice per layer it holds,
stopping at that layer, instead of the whole network running twice per layer. Memory: the two
cached streams plus the original inputs of one block's layers, all over the calibration tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from vitslim.adapters import describe, prepare_for_replacement
from vitslim.errors import VitslimError
from vitslim.lowrank.calibration import images_of
from vitslim.lowrank.whitening import DEFAULT_RIDGE, whitened_spectrum, whitening_factor


def compensated_factors(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, rank: int, ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) minimising ‖X Wᵀ − X̃ (up·down)ᵀ‖² given H = XᵀX̃ (``cross``) and G̃ = X̃ᵀX̃."""
    factor, inverse = whitening_factor(gram, ridge)
    least_squares = weight.double() @ cross.double() @ inverse.T @ inverse  # W H G̃⁻¹
    return whitened_spectrum(least_squares, gram, ridge).factors(rank)


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
    try:
        for batch in batches:
            try:
                model(images_of(batch))
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
        raise VitslimError("a factorised layer was not called by its block; this model cannot be compensated (use --no-compensation)")
    return seen[0]


def _run_recording(block: nn.Module, layers: dict[str, nn.Module], call: tuple[tuple, dict], hidden: torch.Tensor):
    """The block's output on ``hidden`` and the inputs each of ``layers`` saw."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def capture(module, args):
            seen[name] = args[0].reshape(-1, args[0].shape[-1])

        return capture

    handles = [layer.register_forward_pre_hook(keep(name)) for name, layer in layers.items()]
    try:
        output = _hidden(block(hidden, *call[0][1:], **call[1]))
    finally:
        for handle in handles:
            handle.remove()
    return output, seen


@torch.no_grad()
def compensate(original: nn.Module, compressed: nn.Module, names: list[str], batches: Iterable, *, progress: bool = True) -> None:
    """Refit the factorised layers ``names`` (in execution order) of ``compressed`` in place,
    block by block. ``original`` is only read."""
    batches = list(batches)
    original_blocks = describe(original).blocks
    compressed_blocks = describe(compressed).blocks
    qualified = {id(module): name for name, module in compressed.named_modules()}
    calls = _first_block_calls(compressed, compressed_blocks[0].module, batches)
    reference_hidden = [call[0][0] for call in calls]
    hidden = list(reference_hidden)
    bar = tqdm(total=len(names), desc="compensating layers", unit="layer", disable=None if progress else True, leave=False)
    for original_block, block in zip(original_blocks, compressed_blocks):
        # a private copy, prepared like the compressed model, so its layers are always called
        reference = copy.deepcopy(original_block.module)
        prepare_for_replacement(original, part=reference)
        prefix = qualified[id(block.module)] + "."
        own = {name[len(prefix):]: compressed.get_submodule(name) for name in names if name.startswith(prefix)}
        recorded = [_run_recording(reference, {n: reference.get_submodule(n) for n in own}, call, x) for call, x in zip(calls, reference_hidden)]
        for relative, layer in own.items():
            cross = gram = None
            for (_, original_inputs), call, x_tilde_hidden in zip(recorded, calls, hidden):
                x = original_inputs[relative]
                x_tilde = _inputs_until(block.module, layer, call, x_tilde_hidden)
                # per-batch products in the activations' precision, totals in float64 (as in calibration)
                batch_cross, batch_gram = (x.T @ x_tilde).double(), (x_tilde.T @ x_tilde).double()
                cross = batch_cross if cross is None else cross + batch_cross
                gram = batch_gram if gram is None else gram + batch_gram
            up, down = compensated_factors(reference.get_submodule(relative).weight.detach(), cross, gram, layer.rank)
            layer.up.weight.copy_(up.to(layer.up.weight.dtype))
            layer.down.weight.copy_(down.to(layer.down.weight.dtype))
            bar.update()
        reference_hidden = [output for output, _ in recorded]
        hidden = [_hidden(block.module(x, *call[0][1:], **call[1])) for call, x in zip(calls, hidden)]
    bar.close()
