"""Weight-only int8 post-training quantisation: ``quantize_int8(model)``.

Every ``nn.Linear`` (attention and MLP projections, the classifier head, and the ``down``/``up``
children of a ``LowRankLinear``) becomes an ``Int8Linear``: int8 weights with one float32 scale
per output channel, symmetric (no zero point), scale = max|row| / 127. Activations stay in
floating point; the forward pass dequantises the weight and runs a plain ``F.linear``, so it
needs no custom kernel and runs under ``torch.compile`` and ONNX export. The gain is bytes
(weights 4x smaller on disk and in memory), not speed.

The change is recorded as a recipe step ``{"method": "int8", "modules": [...]}``; on reload the
named Linears are replaced by empty ``Int8Linear`` of the same shape before the weights are
loaded strictly. Steps replay in order, so a low-rank step followed by an int8 step rebuilds the
factorised layers first and then quantises their ``down``/``up`` children.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from vitslim.adapters import matching_family, prepare_for_replacement, replace_submodule, replaceable_linears
from vitslim.adapters.base import is_linear
from vitslim.cait.patch import apply_token_merging, merging_suspended
from vitslim.errors import VitslimError
from vitslim.recipe import record_step, register_step

STEP = "int8"
QMAX = 127  # symmetric range [-127, 127]; -128 is never used, so negation is exact


class Int8Linear(nn.Module):
    """``y = x @ (weight * scale[:, None]).T + bias`` with int8 ``weight`` (out, in).

    ``weight`` is an ``nn.Parameter`` with ``requires_grad=False`` (int8 tensors cannot require
    gradients) so that ``count_params`` still counts the weights and the state dict saves them.
    ``scale`` (float32, one per output channel) is a persistent *buffer*, not a parameter: it is
    saved and moved with the module, but it is quantisation metadata, not a model parameter, so
    ``count_params`` of a quantised model equals that of the float model it came from.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise ``linear``'s weight per output channel; the bias is kept as it is (a copy)."""
        weight = linear.weight.detach()
        bias = linear.bias
        layer = cls(linear.in_features, linear.out_features, bias is not None, device=weight.device,
                    bias_dtype=bias.dtype if bias is not None else torch.float32)
        wide = weight.double()  # float64 so the rounding below is against the exact stored scale
        amax = wide.abs().amax(dim=1)
        # a zero row quantises to zeros with any positive scale; 1.0 keeps it finite (no 0/0)
        scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).float()
        quantised = torch.round(wide / scale.double()[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        with torch.no_grad():
            layer.weight.copy_(quantised)
            layer.scale.copy_(scale)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer computes with, exactly as ``forward`` builds it."""
        return self.weight.to(dtype) * self.scale[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 per-channel"


def _prepare(model: nn.Module) -> None:
    # only a model of a family vitslim knows can have a fused path to switch off; any other
    # module (a bare stack of Linears) is quantised as it is
    if matching_family(model) is not None:
        prepare_for_replacement(model)


def _replace_all(model: nn.Module, names: list[str], make) -> None:
    """Replace each named module by ``make(name, module)``, once per module object, so modules
    shared under several names stay shared."""
    made: dict[int, nn.Module] = {}
    for name in names:
        module = model.get_submodule(name)
        if id(module) not in made:
            made[id(module)] = make(name, module)
        replace_submodule(model, name, made[id(module)])


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (the original is left untouched) whose Linears hold int8 weights.

    Weight-only, symmetric, per output channel; biases, norms, embeddings and the patch
    convolution stay in floating point. ``count_params`` is unchanged (the scales are buffers);
    the safetensors file shrinks about 4x where Linears dominate. The list of quantised modules
    is the result's last recipe step, which ``vitslim.save`` writes.
    """
    if isinstance(model, nn.Linear):
        raise VitslimError("quantize_int8 replaces the Linear layers inside a model; for a single layer use Int8Linear.from_linear")
    with merging_suspended(model) as schedule:  # a deep copy would share the original's hooks
        quantised = copy.deepcopy(model).eval()
    # a packed nn.MultiheadAttention's out_proj stays float, as does its in_proj_weight, which is no Linear
    linears = replaceable_linears(quantised)
    if not linears:
        already = any(isinstance(m, Int8Linear) for m in quantised.modules())
        raise VitslimError(
            "the model has no nn.Linear layer left to quantise to int8"
            + (" (it is already int8-quantised)" if already else " (int8 quantisation covers Linear layers only)")
        )
    _prepare(quantised)
    names = list(linears)
    _replace_all(quantised, names, lambda name, linear: Int8Linear.from_linear(linear))
    if schedule is not None:  # its recipe step came with the copy
        apply_token_merging(quantised, schedule, record=False)
    record_step(quantised, {"method": STEP, "modules": names})
    return quantised


@register_step(STEP, summary=lambda step: f"int8 weights ({len(step.get('modules', []))} layers)")
def _rebuild(model: nn.Module, step: dict) -> None:
    """Recipe replay: give each named Linear its int8 shape (weights and scales are loaded after)."""
    _prepare(model)

    def empty(name: str, dense: nn.Module) -> Int8Linear:
        weight = getattr(dense, "weight", None)
        if not is_linear(dense) or not isinstance(weight, torch.Tensor):
            raise VitslimError(f"the recipe quantises {name!r}, which is not a Linear layer in the rebuilt model; the recipe is corrupt")
        bias = getattr(dense, "bias", None)
        return Int8Linear(dense.in_features, dense.out_features, bias is not None, device=weight.device,
                          bias_dtype=bias.dtype if bias is not None else torch.float32)

    try:
        with merging_suspended(model):  # the merging hooks move to the int8 layers
            _replace_all(model, list(step["modules"]), empty)
    except AttributeError as error:
        raise VitslimError(f"the recipe's int8 step names a module the rebuilt model lacks ({error}); the recipe is corrupt") from None
