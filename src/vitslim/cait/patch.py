"""Token merging inside any supported ViT, through hooks rather than copies of its forward methods.

Four narrow hooks do all of it: the model's forward pre-hook starts a fresh ``TokenMap``; at a
merging block, a hook on the key projection keeps the keys (the similarity metric) and a forward
hook on the block merges its output tokens, so every later block runs on fewer tokens; and every
attention module gets a pre-hook that adds proportional attention (``log size``) to the mask its
caller passes, in the form the family's adapter knows (``add_attention_bias``). Nothing of the
model is replaced, so ``remove_token_merging`` gives back the original behaviour exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitslim.adapters import describe, family_of
from vitslim.adapters.base import AttentionSpec, ViTSpec
from vitslim.cait.merging import TokenMap, atme_merge, attention_bias, tome_merge
from vitslim.cait.schedule import MergeSchedule, check_schedule
from vitslim.errors import VitslimError
from vitslim.recipe import drop_steps, record_step, register_step

MERGING_ATTR = "vitslim_merging"
STEP = "merging"


@dataclass
class _Merger:
    """The hooks' shared state for one patched model."""

    spec: ViTSpec
    schedule: MergeSchedule
    handles: list = field(default_factory=list)
    token_map: TokenMap | None = None
    keys: torch.Tensor | None = None

    def start(self, module, args) -> None:
        self.token_map, self.keys = None, None

    def add_bias(self, attention: AttentionSpec):
        family = family_of(self.spec.model)

        def hook(module, args, kwargs):
            if self.token_map is None or not self.token_map.merged:
                return None
            return family.add_attention_bias(attention, args, kwargs, attention_bias(self.token_map))

        return hook

    def _tokens_first(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.spec.batch_first else tensor.transpose(0, 1)

    def keep_keys(self, attention: AttentionSpec):
        """A hook that stores the block's keys, averaged over heads, as ``(B, N, head_dim)``."""
        heads = attention.num_heads

        def mean_over_heads(keys: torch.Tensor) -> torch.Tensor:
            keys = self._tokens_first(keys)
            return keys.reshape(*keys.shape[:2], heads, -1).mean(2)

        if attention.layout == "qkv":
            def from_qkv(module, args, output):
                width = output.shape[-1] // 3
                self.keys = mean_over_heads(output[..., width: 2 * width])
            return attention.qkv, from_qkv, False
        if attention.layout == "separate":
            def from_k(module, args, output):
                self.keys = mean_over_heads(output)
            return attention.k, from_k, False
        packed = attention.packed

        def from_packed(module, args, kwargs):  # nn.MultiheadAttention never calls a k module
            query = args[0] if args else kwargs["query"]
            width = packed.embed_dim
            bias = packed.in_proj_bias[width: 2 * width] if packed.in_proj_bias is not None else None
            self.keys = mean_over_heads(F.linear(query, packed.in_proj_weight[width: 2 * width], bias))
        return packed, from_packed, True

    def merge_after(self, r: int, level: int):
        prefix, grid = self.spec.num_prefix_tokens, self.spec.grid_size

        def hook(module, args, output):
            tokens = self._tokens_first(output[0] if isinstance(output, tuple) else output)
            if self.token_map is None:
                if tokens.shape[1] != prefix + grid[0] * grid[1]:
                    raise VitslimError(
                        f"token merging was planned for {prefix} prefix tokens and a {grid[0]}x{grid[1]} grid, but a block "
                        f"sees {tokens.shape[1]} tokens; feed images of the model's input size"
                    )
                self.token_map = TokenMap.identity(tokens.shape[0], grid, prefix, tokens.device, tokens.dtype)
            if self.schedule.method == "atme":
                merged, self.token_map = atme_merge(tokens, self.keys, self.token_map, r, level)
            else:
                merged, self.token_map = tome_merge(tokens, self.keys, self.token_map, r)
            self.keys = None
            merged = self._tokens_first(merged)
            return (merged, *output[1:]) if isinstance(output, tuple) else merged

        return hook


def apply_token_merging(model: nn.Module, schedule: MergeSchedule, *, record: bool = True, notes: dict | None = None) -> nn.Module:
    """Patch ``model`` in place to merge tokens on ``schedule``; returns it. With ``record`` the
    schedule becomes a recipe step, so a saved folder reloads it, together with ``notes`` (how it
    was chosen and what it measured); for temporary merging (choosing a schedule, training gates,
    measuring) use the ``token_merging`` context manager instead.

    Prefix tokens (class, distillation, registers) are never merged. After a forward pass,
    ``token_map(model)`` says where every original patch went (see ``merging.unmerge``).
    """
    _attach(model, schedule)
    if record:
        record_step(model, {"method": STEP, "schedule": schedule.as_dict(), **(notes or {})})
    return model


def remove_token_merging(model: nn.Module) -> nn.Module:
    """Undo ``apply_token_merging``: hooks removed, recipe step dropped, original behaviour back."""
    _detach(model)
    drop_steps(model, STEP)
    return model


@contextmanager
def token_merging(model: nn.Module, schedule: MergeSchedule | None) -> Iterator[nn.Module]:
    """``model`` merging tokens on ``schedule`` inside the with-block only, with no recipe step
    (``None``: no merging). The model must not be merging already."""
    if schedule is None:
        yield model
        return
    _attach(model, schedule)
    try:
        yield model
    finally:
        _detach(model)


@contextmanager
def merging_suspended(model: nn.Module) -> Iterator[MergeSchedule | None]:
    """The merging hooks off while the with-block replaces the model's modules (int8 layers, sliced
    channels), then attached again, on the same schedule, to the modules the model has then. The
    recipe is left as it is. Yields the schedule (None: the model does not merge tokens)."""
    schedule = merge_schedule(model)
    if schedule is None:
        yield None
        return
    _detach(model)
    try:
        yield schedule
    finally:
        _attach(model, schedule)


def _attach(model: nn.Module, schedule: MergeSchedule) -> None:
    if getattr(model, MERGING_ATTR, None) is not None:
        raise VitslimError("this model already merges tokens; remove_token_merging(model) first")
    spec = describe(model)
    depth = len(spec.blocks)
    for block, _, _ in schedule.steps:
        if not 0 <= block < depth:
            raise VitslimError(f"the merge schedule names block {block}, but the model has blocks 0-{depth - 1}")
    check_schedule(schedule, spec.grid_size, spec.num_prefix_tokens)
    merger = _Merger(spec, schedule)
    merger.handles.append(model.register_forward_pre_hook(merger.start))
    for block in spec.blocks:
        merger.handles.append(block.attention.module.register_forward_pre_hook(merger.add_bias(block.attention), with_kwargs=True))
    for index, r, level in schedule.steps:
        block = spec.blocks[index]
        module, hook, before = merger.keep_keys(block.attention)
        if before:
            merger.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            merger.handles.append(module.register_forward_hook(hook))
        merger.handles.append(block.module.register_forward_hook(merger.merge_after(r, level)))
    object.__setattr__(model, MERGING_ATTR, merger)  # a plain attribute: not a module, not in the state dict


def _detach(model: nn.Module) -> None:
    merger = getattr(model, MERGING_ATTR, None)
    if merger is None:
        raise VitslimError("this model does not merge tokens")
    for handle in merger.handles:
        handle.remove()
    delattr(model, MERGING_ATTR)


def merge_schedule(model: nn.Module) -> MergeSchedule | None:
    merger = getattr(model, MERGING_ATTR, None)
    return None if merger is None else merger.schedule


def token_map(model: nn.Module) -> TokenMap | None:
    """Where the last forward pass put every patch (None before any merge happened)."""
    merger = getattr(model, MERGING_ATTR, None)
    return None if merger is None else merger.token_map


MERGE_NAMES = {"atme": "ATME", "tome": "ToMe"}


def _summary(step: dict) -> str:
    schedule = step.get("schedule", {})
    merges = schedule.get("steps", [])
    measured = step.get("measured_speedup")
    return (f"{MERGE_NAMES.get(schedule.get('method'), schedule.get('method'))} token merging: {sum(r for _, r, _ in merges)} tokens after blocks "
            f"{', '.join(str(b) for b, _, _ in merges)}" + (f", concentration {step['concentration']:g}" if "concentration" in step else "")
            + (f", measured {measured:.2f}x" if measured else ""))


@register_step(STEP, summary=_summary)
def _rebuild(model: nn.Module, step: dict) -> None:
    apply_token_merging(model, MergeSchedule.from_dict(step["schedule"]), record=False)
