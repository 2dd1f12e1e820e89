"""Post-training int8 quantisation of every Linear: ``quantize_int8(model, kind="weight" | "dynamic")``.

Both kinds replace every ``nn.Linear`` (attention and MLP projections, the classifier head, and
the ``down``/``up`` children of a ``LowRankLinear``) by a layer holding int8 weights with one
float32 scale per output channel, symmetric (no zero point), scale = max|row| / 127; biases,
norms, embeddings and the patch convolution stay in floating point. They differ in how the layer
computes:

* ``"weight"`` (``Int8Linear``, the smallest file): the forward pass dequantises the weight and
  runs a plain ``F.linear``, so it needs no custom kernel and runs under ``torch.compile`` and
  ONNX export. The gain is bytes (weights 4x smaller on disk and in memory), not speed: the
  dequantisation costs time on every call.
* ``"dynamic"`` (``DynamicInt8Linear``, faster matmuls): activations are quantised to uint8 at
  run time (one scale per call) and the matmul runs in int8 through PyTorch's own quantized CPU
  kernels (``torch.ops.quantized.linear_dynamic``: fbgemm or oneDNN). It stores exactly what
  ``Int8Linear`` stores, so the file is as small, nothing is pickled, and the kernel's packed
  copy of the weights is rebuilt from the int8 tensors whenever they are loaded. Off the CPU, in
  a dtype other than float32, and while ``torch.export`` or the ONNX exporter traces it (the
  packed weights are not traceable), it computes as ``Int8Linear`` does.

The change is recorded as a recipe step ``{"method": "int8", "kind": ..., "modules": [...]}``
(recipes without ``kind`` are weight-only); on reload the named Linears are replaced by empty
layers of the same shape and kind before the weights are loaded strictly. Steps replay in order,
so a low-rank step followed by an int8 step rebuilds the factorised layers first and then
quantises their ``down``/``up`` children.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Collection

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import flop_counter

from vitslim.adapters import matching_family, prepare_for_replacement, replace_submodule, replaceable_linears
from vitslim.adapters.base import is_linear
from vitslim.adapters.replacement import copy_model, replacing_modules
from vitslim.errors import ParameterError, VitslimError
from vitslim.io.recipe import record_step, register_step, step_field, step_layer

STEP = "int8"
QMAX = 127  # symmetric range [-127, 127]; -128 is never used, so negation is exact
KINDS = ("weight", "dynamic")  # weight-only (smallest file), dynamic (int8 matmuls, faster on CPU)
# dynamic int8's activations: 7-bit (PyTorch's default for fbgemm) unless the CPU has AVX-512 VNNI;
# on vit-d6-cifar10 the 7-bit range cost 0.35 points of top-1, the full range none (docs/export.md)
ACTIVATIONS_REDUCE_RANGE = not torch.cpu._is_vnni_supported()


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


class _KernelWeights:
    """The quantized kernel's packed weights (a TorchScript object), held one step away from the
    module: ``torch.export`` turns every such object it finds among a module's attributes into a
    fake one before tracing, which this kind cannot do, even when the traced path never reads it."""

    def __init__(self, packed) -> None:
        self.packed = packed


class DynamicInt8Linear(Int8Linear):
    """``Int8Linear`` whose matmul runs in int8: the input is quantised at run time and multiplied
    by the int8 weight in PyTorch's quantized CPU kernel, which is what makes it faster than float.

    Stores exactly ``Int8Linear``'s tensors (int8 ``weight``, per-channel ``scale``, float
    ``bias``); the kernel's packed copy of them is no tensor of the module's, never saved, built when the
    layer is made and again whenever its weights are loaded. The activations use the full 8-bit
    range where the CPU has VNNI (its int8 dot products cannot overflow) and PyTorch's reduced 7-bit
    range elsewhere, where fbgemm's 16-bit pairwise sums could saturate.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, device=device, bias_dtype=bias_dtype)
        self._pack()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DynamicInt8Linear:
        """Quantise ``linear`` as ``Int8Linear.from_linear`` does, then pack the result for the kernel."""
        layer = super().from_linear(linear)
        layer._pack()
        return layer

    def _pack(self) -> None:
        self._packed = _KernelWeights(None)
        if self.weight.device.type != "cpu":
            return  # the quantized kernels are CPU-only; forward falls back to Int8Linear's path
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.13 warns that quantized tensors are deprecated; this one only feeds the packing
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            weight = torch._make_per_channel_quantized_tensor(self.weight.detach(), self.scale.double(), zero_points, 0)
        bias = self.bias.detach().float() if self.bias is not None else None
        self._packed = _KernelWeights(torch.ops.quantized.linear_prepack(weight, bias))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._pack()

    def _apply(self, fn, recurse=True):
        moved = super()._apply(fn, recurse)
        self._pack()  # a move or a dtype change leaves the packed copy behind
        return moved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed.packed
        if packed is None or x.dtype != torch.float32 or x.device.type != "cpu" or torch.compiler.is_exporting():
            return super().forward(x)
        return torch.ops.quantized.linear_dynamic(x, packed, ACTIVATIONS_REDUCE_RANGE)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dynamic int8 activations"


LAYERS = {"weight": Int8Linear, "dynamic": DynamicInt8Linear}


def _dynamic_linear_flops(input_shape, packed, reduce_range=False, *, out_shape) -> int:
    """Multiply-adds of the int8 matmul, counted as a float one's: the packed weight has no shape
    to read, but the output's last dimension is its number of output channels."""
    return 2 * math.prod(input_shape) * out_shape[-1]


# torch's FlopCounterMode (``vitslim.measure.metrics.count_flops``) has no rule for the quantized kernel and
# would count a dynamic int8 model's Linears as zero FLOPs
if torch.ops.quantized.linear_dynamic not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(torch.ops.quantized.linear_dynamic)(_dynamic_linear_flops)


@contextlib.contextmanager
def weight_only_matmuls(model: nn.Module):
    """Within the block, ``model``'s dynamic int8 layers compute as weight-only ones (float
    matmuls over the dequantised weights): what an exporter captures of them, and so the
    reference an exported file is checked against. Any other model is left as it is."""
    layers = [module for module in model.modules() if isinstance(module, DynamicInt8Linear)]
    kernels = [layer._packed for layer in layers]
    for layer in layers:
        layer._packed = _KernelWeights(None)
    try:
        yield model
    finally:
        for layer, kernel in zip(layers, kernels):
            layer._packed = kernel


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


def check_kind(kind: object, parameter: str = "kind") -> str:
    """``kind`` if it names an int8 kind, else an error naming ``parameter`` and the kinds there are."""
    if kind not in KINDS:
        raise ParameterError(parameter, f"must be 'weight' (weight-only, the smallest file) or 'dynamic' "
                                        f"(int8 matmuls, faster on CPU), not {kind!r}")
    return kind


def quantize_int8(model: nn.Module, kind: str = "weight", *, keep_float: Collection[str] = ()) -> nn.Module:
    """A copy of ``model`` (the original is left untouched) whose Linears hold int8 weights.

    Symmetric, per output channel; biases, norms, embeddings and the patch convolution stay in
    floating point. ``kind="weight"`` dequantises the weights on every call (smallest file, no
    faster); ``kind="dynamic"`` also quantises the activations at run time and runs int8 matmuls
    (same file size, faster on CPU). ``keep_float`` names Linears to leave in float32 (those
    whose int8 error the model's output cannot afford: ``vitslim.deploy.int8_fallback``).
    ``count_params`` is unchanged (the scales are buffers); the safetensors file shrinks about 4x
    where Linears dominate. The list of quantised modules is the result's last recipe step, which
    ``vitslim.save`` writes.
    """
    layer = LAYERS[check_kind(kind)]
    if isinstance(model, nn.Linear):
        raise VitslimError(f"quantize_int8 replaces the Linear layers inside a model; for a single layer use {layer.__name__}.from_linear")
    quantised = copy_model(model).eval()
    family = matching_family(quantised)
    with replacing_modules(quantised):  # hooks kept on the model (token merging's) move to the new modules
        if family is not None:  # a packed nn.MultiheadAttention's projections become Linears, quantised as timm's are
            family.unpack_attention(quantised)
        linears = replaceable_linears(quantised)
        unknown = sorted(set(keep_float) - set(linears))
        if unknown:
            raise ParameterError("keep_float", f"names {', '.join(unknown)}, which are not Linears int8 could quantise in this model")
        if not linears:
            already = any(isinstance(m, Int8Linear) for m in quantised.modules())
            raise VitslimError(
                "the model has no nn.Linear layer left to quantise to int8"
                + (" (it is already int8-quantised)" if already else " (int8 quantisation covers Linear layers only)")
            )
        names = [name for name in linears if name not in set(keep_float)]
        if not names:
            raise ParameterError("keep_float", "keeps every Linear in float32, which leaves nothing to quantise")
        _prepare(quantised)
        _replace_all(quantised, names, lambda name, linear: layer.from_linear(linear))
    record_step(quantised, {"method": STEP, "kind": kind, "modules": names})
    return quantised


def int8_layers(model: nn.Module) -> dict[str, str]:
    """The int8 layers of ``model`` by qualified name, with their kind ("weight" or "dynamic")."""
    return {name: "dynamic" if isinstance(module, DynamicInt8Linear) else "weight"
            for name, module in model.named_modules() if isinstance(module, Int8Linear)}


def dequantised(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose int8 layers are plain float Linears holding the dequantised
    weights: the same function as the weight-only computation, with the weights as constants. ONNX
    Runtime's quantiser quantises a MatMul only when its weight is a constant, and re-quantising
    ``q * s`` per output channel gives back ``q`` and ``s``, so its int8 file runs the same int8
    weights (``vitslim.deploy.export.export_onnx(..., int8="dynamic")``)."""
    twin = copy_model(model)
    names = list(int8_layers(twin))

    def dense(name: str, layer: Int8Linear) -> nn.Linear:
        linear = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device=layer.weight.device)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.float())
        return linear

    with replacing_modules(twin):
        _replace_all(twin, names, dense)
    return twin


def _summary(step: dict) -> str:
    layers = len(step.get("modules", []))
    if step.get("kind", "weight") == "dynamic":
        return f"int8 dynamic: int8 weights, activations quantised at run time ({layers} layers)"
    return f"int8 weights ({layers} layers)"


@register_step(STEP, summary=_summary)
def _rebuild(model: nn.Module, step: dict) -> None:
    """Recipe replay: give each named Linear its int8 shape and kind (weights and scales are loaded after)."""
    kind = step.get("kind", "weight")  # recipes written before dynamic int8 existed are weight-only
    if kind not in KINDS:
        raise VitslimError(f"the recipe's int8 step has kind {kind!r}, which this vitslim version cannot rebuild "
                           f"(it knows {', '.join(KINDS)}); upgrade vitslim")
    _prepare(model)

    def empty(name: str, dense: nn.Module) -> Int8Linear:
        weight = getattr(dense, "weight", None)
        if not is_linear(dense) or not isinstance(weight, torch.Tensor):
            raise VitslimError(f"the recipe quantises {name!r}, which is not a Linear layer in the rebuilt model; the recipe is corrupt")
        bias = getattr(dense, "bias", None)
        return LAYERS[kind](dense.in_features, dense.out_features, bias is not None, device=weight.device,
                            bias_dtype=bias.dtype if bias is not None else torch.float32)

    names = step_field(step, "modules", list)
    for name in names:  # every name checked before any layer is replaced
        step_layer(model, name, "the int8 step")
    with replacing_modules(model):  # hooks kept on the model (token merging's) move to the int8 layers
        _replace_all(model, names, empty)
