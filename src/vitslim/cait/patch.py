"""Token merging inside any supported ViT, through hooks rather than copies of its forward methods.

Narrow hooks do all of it: the first block's forward pre-hook starts a fresh ``TokenMap`` (so
``forward_features``, ``forward_intermediates`` and a user's model calling the ViT all work); at
a merging block, a hook on the key projection keeps the keys (the similarity metric) and a
forward hook on the block merges its output tokens, so every later block runs on fewer tokens;
and every attention module gets a pre-hook that adds proportional attention (``log size``) to
the mask its caller passes, in the form the family's adapter knows (``add_attention_bias``).

Two modes. In *classification* mode the merged tokens flow on to the model's head: the fast path
when the output reads only the class token. In *dense* mode every block hands on the full
``prefix + H×W`` token map and the next block's pre-hook takes the merged tokens back out of it
(``merging.compact``), so each block still computes on exactly the merged tokens classification
mode has, while everything outside the blocks (the final norm, ``forward_intermediates``, HF's
``hidden_states``, a dense head) sees the shapes it expects. The full map keeps each patch's own
residual: at a merge, what set a patch apart from the token it joined (its ``detail``) is kept
aside, and every later full map is ``unmerge(merged tokens) + detail``. So merging shares the
later blocks' *updates* among a token's patches, as ToMe for Stable Diffusion does inside each
block, instead of replacing every patch by one average (plain ``merging.unmerge``, ``detail=False``),
which blurs a dense map down to the merged grid. Dense mode is chosen when the output depends on the patch
tokens (``reads_patch_tokens``). Nothing of the model is replaced, so ``remove_token_merging``
gives back the original behaviour exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vitslim.adapters import describe, family_of
from vitslim.adapters.base import AttentionSpec, ViTSpec
from vitslim.adapters.replacement import register_hook_owner
from vitslim.cait.merging import (
    TokenMap,
    atme_merge,
    attention_bias,
    compact,
    lattice_merge,
    representatives,
    row_column_merge,
    tome_merge,
    unmerge,
    window_merge,
)
from vitslim.cait.schedule import MergeSchedule, check_schedule, merge_key, recorded_merge
from vitslim.deploy.export import register_decision_jitter
from vitslim.errors import VitslimError
from vitslim.io.recipe import CORRUPT, drop_steps, record_step, register_step, step_field, step_number

MERGING_ATTR = "vitslim_merging"
VIT_MERGER_ATTR = "vitslim_merger"  # on the ViT inside a user's model: its blocks' merger, for jittered_merge_keys on that part alone
STEP = "merging"
HIDDEN_STATES_NAMES = ("x", "hidden_states", "src")  # a block's token argument when passed by keyword (timm, HF, torch.nn)


@dataclass
class _Merger:
    """The hooks' shared state for one patched model."""

    spec: ViTSpec
    schedule: MergeSchedule
    dense: bool
    handles: list = field(default_factory=list)
    token_map: TokenMap | None = None
    keys: torch.Tensor | None = None
    keep_detail: bool = True
    full_map_after: frozenset[int] | None = None  # dense mode: the blocks whose output is the full map (None: every block)
    kept: torch.Tensor | None = None  # dense mode, once merged: one original patch position per current token
    detail: torch.Tensor | None = None  # dense mode: full map minus unmerge(merged tokens), tokens first
    key_jitter: tuple[float, torch.Generator] | None = None  # (relative scale, generator) inside jittered_merge_keys

    def hook_key(self) -> str:
        """What these hooks compute, for a cache of exported graphs (``measure.runtimes.onnx_cache_key``)."""
        return json.dumps({"schedule": self.schedule.as_dict(), "dense": self.dense, "detail": self.keep_detail,
                           "full_map_after": sorted(self.full_map_after) if self.full_map_after is not None else None}, sort_keys=True)

    def start(self, module, args) -> None:
        self.token_map, self.keys, self.kept, self.detail = None, None, None, None

    def hands_on_full_map(self, index: int) -> bool:
        """Dense mode: whether block ``index``'s output is the full token map (else its merged tokens)."""
        return self.full_map_after is None or index in self.full_map_after

    def _full(self, tokens: torch.Tensor) -> torch.Tensor:
        full = unmerge(tokens, self.token_map)
        return full if self.detail is None else full + self.detail

    def compact(self, module, args, kwargs):
        """Dense mode, before a block: the full token map back to one row per current token."""
        if self.kept is None:
            return None
        prefix = self.spec.num_prefix_tokens

        def compacted(tokens: torch.Tensor) -> torch.Tensor:
            tokens = self._tokens_first(tokens)
            return self._tokens_first(compact(tokens if self.detail is None else tokens - self.detail, self.kept, prefix))

        if args:
            return (compacted(args[0]), *args[1:]), kwargs
        name = next(key for key in HIDDEN_STATES_NAMES if key in kwargs)
        return args, {**kwargs, name: compacted(kwargs[name])}

    def expand(self, module, args, output):
        """Dense mode, after a block that does not merge: the full token map again."""
        if self.kept is None:
            return None
        return self._replace(output, self._full(self._tokens_first(output[0] if isinstance(output, tuple) else output)))

    def _replace(self, output, tokens: torch.Tensor):
        tokens = self._tokens_first(tokens)
        return (tokens, *output[1:]) if isinstance(output, tuple) else tokens

    # The hooks below are partials of bound methods, not closures: copy.deepcopy of a patched model
    # then copies them bound to the copy's own _Merger (a closure would keep the original's state).

    def add_bias(self, attention: AttentionSpec):
        return partial(self._add_bias, attention)

    def _add_bias(self, attention: AttentionSpec, module, args, kwargs):
        if self.token_map is None or not self.token_map.merged:
            return None
        return family_of(self.spec.model).add_attention_bias(attention, args, kwargs, attention_bias(self.token_map))

    def _tokens_first(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.spec.batch_first else tensor.transpose(0, 1)

    def keep_keys(self, attention: AttentionSpec):
        """(module, hook, whether it is a pre-hook): a hook that stores the block's keys, averaged
        over heads, as ``(B, N, head_dim)``."""
        heads = attention.num_heads
        if attention.layout == "qkv":
            return attention.qkv, partial(self._keys_from_qkv, heads), False
        if attention.layout == "separate":
            return attention.k, partial(self._keys_from_k, heads), False
        return attention.packed, partial(self._keys_from_packed, heads), True  # nn.MultiheadAttention never calls a k module

    def _mean_over_heads(self, keys: torch.Tensor, heads: int) -> torch.Tensor:
        keys = self._tokens_first(keys)
        return keys.reshape(*keys.shape[:2], heads, -1).mean(2)

    def _keys_from_qkv(self, heads: int, module, args, output) -> None:
        width = output.shape[-1] // 3
        self.keys = self._mean_over_heads(output[..., width: 2 * width], heads)

    def _keys_from_k(self, heads: int, module, args, output) -> None:
        self.keys = self._mean_over_heads(output, heads)

    def _keys_from_packed(self, heads: int, packed: nn.MultiheadAttention, args, kwargs) -> None:
        query = args[0] if args else kwargs["query"]
        width = packed.embed_dim
        bias = packed.in_proj_bias[width: 2 * width] if packed.in_proj_bias is not None else None
        self.keys = self._mean_over_heads(F.linear(query, packed.in_proj_weight[width: 2 * width], bias), heads)

    def merge_after(self, index: int, r: int, level: int):
        return partial(self._merge_after, index, r, level)

    def _merge_after(self, index: int, r: int, level: int, module, args, output):
        prefix, grid = self.spec.num_prefix_tokens, self.spec.grid_size
        tokens = self._tokens_first(output[0] if isinstance(output, tuple) else output)
        if self.token_map is None:
            if tokens.shape[1] != prefix + grid[0] * grid[1]:
                raise VitslimError(
                    f"token merging was planned for {prefix} prefix tokens and a {grid[0]}x{grid[1]} grid, but a block "
                    f"sees {tokens.shape[1]} tokens; feed images of the model's input size"
                )
            self.token_map = TokenMap.identity(tokens.shape[0], grid, prefix, tokens.device, tokens.dtype)
        before = self._full(tokens) if self.dense and self.keep_detail and self.token_map.merged else tokens
        keys = self.keys
        if self.key_jitter is not None:
            scale, generator = self.key_jitter
            keys = keys * (1 + scale * torch.randn(keys.shape, generator=generator).to(keys))
        if self.schedule.merge == "atme":
            merged, self.token_map = atme_merge(tokens, keys, self.token_map, r, self.schedule.radius)
        elif self.schedule.merge == "atme-lattice":
            merged, self.token_map = lattice_merge(tokens, keys, self.token_map, r, level)
        elif self.schedule.merge == "row-column":
            merged, self.token_map = row_column_merge(tokens, keys, self.token_map, r, level)
        elif self.schedule.merge == "window":
            merged, self.token_map = window_merge(tokens, keys, self.token_map, r, level)
        else:
            merged, self.token_map = tome_merge(tokens, keys, self.token_map, r)
        self.keys = None
        if self.dense and self.token_map.merged:
            self.kept = representatives(self.token_map)
            if not self.keep_detail:
                return self._replace(output, unmerge(merged, self.token_map) if self.hands_on_full_map(index) else merged)
            self.detail = before - unmerge(merged, self.token_map)
            return self._replace(output, before if self.hands_on_full_map(index) else merged)
        return self._replace(output, merged)


def reads_patch_tokens(model: nn.Module) -> bool:
    """Whether ``model``'s output depends on the ViT's patch tokens, so merging must hand the full
    token map on (dense mode): always for a user's model around the ViT (a dense head, or a head
    vitslim cannot see into), else as the family's adapter says (pooling over patches or not)."""
    spec = describe(model)
    return spec.root is not None or family_of(spec.model).output_reads_patch_tokens(spec.model)


def full_maps_read(model: nn.Module, schedule: MergeSchedule, *, images: int = 2) -> tuple[int, ...] | None:
    """The blocks, besides the last, whose full token map ``model`` reads when it merges densely
    on ``schedule``: ``()`` when its output comes from the ViT's final map alone (a head on the
    last layer), None (every block) when anything reads an intermediate one (``forward_intermediates``,
    ``output_hidden_states``, a hook of the user's).

    Found by running ``model`` on a few seeded random images both ways: a reader of an
    intermediate map gets merged tokens instead of the full grid, and fails or computes something
    else; a model that gives the same output to float rounding reads only the final map. Only a
    user's model around a ViT is probed: its forward is the call it will serve. A bare timm or
    Hugging Face ViT keeps the full map after every block, since its callers choose at call time
    what to read (``forward_intermediates``, ``output_hidden_states=True``)."""
    spec = describe(model)
    if spec.root is None:
        return None
    inputs = torch.randn(images, *spec.preprocessing.input_size, generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    with torch.no_grad():
        with token_merging(model, schedule, dense=True):
            everywhere = spec.output(inputs)
        try:
            with token_merging(model, schedule, dense=True, full_map_after=()):
                last_only = spec.output(inputs)
        except Exception:  # a reader of an intermediate map met merged tokens: a shape it cannot take
            return None
    if last_only.shape != everywhere.shape:
        return None
    scale = float(everywhere.abs().max()) or 1.0
    return () if torch.allclose(last_only, everywhere, rtol=1e-4, atol=1e-4 * scale) else None


def check_not_merging(model: nn.Module) -> None:
    """Refuse a model that merges tokens already: a second schedule would plan from token counts
    the first one changed."""
    if merge_schedule(model) is not None:
        raise VitslimError("the model already merges tokens; compress the original model")


def apply_token_merging(model: nn.Module, schedule: MergeSchedule, *, dense: bool | None = None, record: bool = True,
                        notes: dict | None = None, full_map_after: Iterable[int] | None = None) -> nn.Module:
    """Patch ``model`` in place to merge tokens on ``schedule``; returns it. With ``record`` the
    schedule becomes a recipe step, so a saved folder reloads it, together with ``notes`` (how it
    was chosen and what it measured); for temporary merging (choosing a schedule, training gates,
    measuring) use the ``token_merging`` context manager instead. ``dense`` chooses the mode
    (module docstring); None: dense exactly when ``reads_patch_tokens(model)``. In dense mode,
    ``full_map_after`` names the blocks, besides the last, whose output is the full token map (the
    ones something reads: ``full_maps_read``); the others hand their merged tokens straight on,
    which spares each a gather and a scatter. None: every block, as before 0.2.

    Prefix tokens (class, distillation, registers) are never merged. After a forward pass,
    ``token_map(model)`` says where every original patch went (see ``merging.unmerge``).
    """
    dense = reads_patch_tokens(model) if dense is None else dense
    after = None if full_map_after is None or not dense else frozenset(full_map_after)
    _attach(model, schedule, dense, full_map_after=after)
    if record:
        lazy = {} if after is None else {"full_map_after": sorted(after)}
        record_step(model, {"method": STEP, "schedule": schedule.as_dict(), "dense": dense, **lazy, **(notes or {})})
    return model


def remove_token_merging(model: nn.Module) -> nn.Module:
    """Undo ``apply_token_merging``: hooks removed, recipe step dropped, original behaviour back."""
    _detach(model)
    drop_steps(model, STEP)
    return model


@contextmanager
def token_merging(model: nn.Module, schedule: MergeSchedule | None, *, dense: bool | None = None,
                  detail: bool = True, full_map_after: Iterable[int] | None = None) -> Iterator[nn.Module]:
    """``model`` merging tokens on ``schedule`` inside the with-block only, with no recipe step
    (``None``: no merging), in the mode ``apply_token_merging`` would choose unless ``dense`` says.
    ``detail=False`` restores a dense map by plain unmerging, for comparison (module docstring).
    ``full_map_after`` as for ``apply_token_merging``. The model must not be merging already."""
    if schedule is None:
        yield model
        return
    _attach(model, schedule, reads_patch_tokens(model) if dense is None else dense, detail,
            None if full_map_after is None else frozenset(full_map_after))
    try:
        yield model
    finally:
        _detach(model)


def _take_off(model: nn.Module) -> tuple[MergeSchedule, bool, bool, frozenset[int] | None] | None:
    """The merging hooks off ``model`` for a module replacement or a copy; what puts them back."""
    merger = getattr(model, MERGING_ATTR, None)
    if merger is None:
        return None
    _detach(model)
    return merger.schedule, merger.dense, merger.keep_detail, merger.full_map_after


register_hook_owner(_take_off, lambda model, state: _attach(model, *state))


def merging_mode(model: nn.Module) -> bool | None:
    """Whether ``model``'s merging runs in dense mode (None: it does not merge tokens)."""
    merger = getattr(model, MERGING_ATTR, None)
    return None if merger is None else merger.dense


def _attach(model: nn.Module, schedule: MergeSchedule, dense: bool, detail: bool = True,
            full_map_after: frozenset[int] | None = None) -> None:
    if getattr(model, MERGING_ATTR, None) is not None:
        raise VitslimError("this model already merges tokens; remove_token_merging(model) first")
    spec = describe(model)
    depth = len(spec.blocks)
    for block, _, _ in schedule.steps:
        if not 0 <= block < depth:
            raise VitslimError(f"the merge schedule names block {block}, but the model has blocks 0-{depth - 1}")
    check_schedule(schedule, spec.grid_size, spec.num_prefix_tokens)
    if full_map_after is not None:
        if not all(isinstance(index, int) and 0 <= index < depth for index in full_map_after):
            raise VitslimError(f"full_map_after names blocks {sorted(full_map_after)}, but the model has blocks 0-{depth - 1}")
        full_map_after = frozenset(full_map_after) | {depth - 1}  # the ViT's own output is always the full map
    merger = _Merger(spec, schedule, dense, keep_detail=detail, full_map_after=full_map_after)
    merger.handles.append(spec.blocks[0].module.register_forward_pre_hook(merger.start))
    merges = {index: (r, level) for index, r, level in schedule.steps}
    for block in spec.blocks:
        merger.handles.append(block.attention.module.register_forward_pre_hook(merger.add_bias(block.attention), with_kwargs=True))
        if dense and block.index > 0 and merger.hands_on_full_map(block.index - 1):
            merger.handles.append(block.module.register_forward_pre_hook(merger.compact, with_kwargs=True))
        if block.index in merges:
            module, hook, before = merger.keep_keys(block.attention)
            if before:
                merger.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                merger.handles.append(module.register_forward_hook(hook))
            # first among the block's forward hooks, so that others (transformers' hidden-state capture) see the full map
            merger.handles.append(block.module.register_forward_hook(merger.merge_after(block.index, *merges[block.index]), prepend=True))
        elif dense and merger.hands_on_full_map(block.index):
            merger.handles.append(block.module.register_forward_hook(merger.expand, prepend=True))
    object.__setattr__(model, MERGING_ATTR, merger)  # a plain attribute: not a module, not in the state dict
    if spec.model is not model:
        object.__setattr__(spec.model, VIT_MERGER_ATTR, merger)


def _detach(model: nn.Module) -> None:
    merger = getattr(model, MERGING_ATTR, None)
    if merger is None:
        raise VitslimError("this model does not merge tokens")
    for handle in merger.handles:
        handle.remove()
    delattr(model, MERGING_ATTR)
    if hasattr(merger.spec.model, VIT_MERGER_ATTR):
        delattr(merger.spec.model, VIT_MERGER_ATTR)


def merges_densely(model: nn.Module) -> bool:
    """Whether ``model`` merges tokens in dense mode (False when it does not merge)."""
    merger = getattr(model, MERGING_ATTR, None)
    return merger is not None and merger.dense


def merge_schedule(model: nn.Module) -> MergeSchedule | None:
    merger = getattr(model, MERGING_ATTR, None)
    return None if merger is None else merger.schedule


def token_map(model: nn.Module) -> TokenMap | None:
    """Where the last forward pass put every patch (None before any merge happened)."""
    merger = getattr(model, MERGING_ATTR, None)
    return None if merger is None else merger.token_map


@contextmanager
def jittered_merge_keys(model: nn.Module, scale: float, seed: int = 0) -> Iterator[bool]:
    """Within the block, every merge of ``model`` (or of a ViT inside it) decides on its keys
    multiplied by ``1 + scale·noise`` (seeded normal noise); yields whether anything merges.

    A merge decision is a top-k and an argmax over cosine scores: where two scores are nearly
    equal, two correct float32 runs that round differently (PyTorch and ONNX Runtime) may merge
    different tokens and give outputs far apart. Runs with jittered keys tell which images sit
    at such a tie (``export.check_onnx``)."""
    found = (getattr(module, name, None) for module in model.modules() for name in (MERGING_ATTR, VIT_MERGER_ATTR))
    mergers = list({id(merger): merger for merger in found if merger is not None}.values())
    generator = torch.Generator().manual_seed(seed)
    for merger in mergers:
        merger.key_jitter = (scale, generator)
    try:
        yield bool(mergers)
    finally:
        for merger in mergers:
            merger.key_jitter = None


register_decision_jitter(jittered_merge_keys)


MERGE_NAMES = {"atme": "ATME", "atme-lattice": "ATME (lattice reading)", "tome": "ToMe", "window": "2x2-window (ALGM-style)",
               "row-column": "row/column (CubistMerge-style)"}


def _summary(step: dict) -> str:
    schedule = step.get("schedule", {})
    merges = schedule.get("steps", [])
    measured = step.get("measured_speedup")
    merge = recorded_merge(schedule)
    return (f"{MERGE_NAMES.get(merge, merge)} token merging: {sum(r for _, r, _ in merges)} tokens after blocks "
            f"{', '.join(str(b) for b, _, _ in merges)}" + (f", concentration {step['concentration']:g}" if "concentration" in step else "")
            + (f", measured {measured:.2f}x" if measured else "") + (_dense_summary(step) if step.get("dense") else ""))


def _dense_summary(step: dict) -> str:
    after = step.get("full_map_after")
    if after is None:
        return ", full token map restored (dense)"
    return ", full token map restored (dense) after the last block" + (f" and blocks {', '.join(map(str, after))}" if after else "")


MAX_LEVEL = 62
"""The highest sub-grid level a recipe may name: steps of 2^31 tokens, past any image's grid (the
step sizes are powers of two, so a corrupt level would otherwise build a number of its size)."""


@register_step(STEP, summary=_summary)
def _rebuild(model: nn.Module, step: dict) -> None:
    """Recipe replay: attach the recorded schedule, its numbers checked as whole numbers first
    (``MergeSchedule`` and ``_attach`` check them against the model)."""
    schedule = step_field(step, "schedule", dict)
    merges = step_field(schedule, "steps", list)
    tokens = describe(model).num_patches
    for entry in merges:
        if not isinstance(entry, list) or len(entry) != 3:
            raise VitslimError(f"the merge schedule step {entry!r:.60} is not [block, r, level]; {CORRUPT}")
        block, r, level = entry
        step_number(block, "a merge schedule's block", 0, len(describe(model).blocks) - 1)
        step_number(r, f"block {block}'s merge count r", 0, tokens)
        step_number(level, f"block {block}'s merge level", 1, MAX_LEVEL)
    step_field(schedule, merge_key(schedule), str)
    merge = recorded_merge(schedule)
    radius = {"radius": step_field(schedule, "radius", float)} if merge == "atme" else {}
    full_map_after = None
    if "full_map_after" in step:  # written from 0.2 on: only these blocks (and the last) hand on the full map
        full_map_after = [step_number(index, "a block handing on the full token map", 0, len(describe(model).blocks) - 1)
                          for index in step_field(step, "full_map_after", list)]
    apply_token_merging(model, MergeSchedule(merge, tuple(map(tuple, merges)), **radius),
                        dense=step_field(step, "dense", bool) if "dense" in step else False, record=False, full_map_after=full_map_after)
