"""CDCP's channel gates: the masks a model trains with before ``cait.slicing`` cuts it to the
widths they keep. Our reading of arXiv 2309.15755 (docs/methods-cait.md).

``attach_gates`` gives each block learnable gate logits whose 0/1 masks multiply the query and
key channels (one mask for both: their dot product runs over the same channels), the value
channels (which are also the output projection's inputs) and the MLP hidden units. With
``consistent=True`` (CDCP) the query/key mask and the value mask run over the head dimension and
are shared by every head, so all heads keep one width and attention stays one batched matmul;
``consistent=False`` gives every head its own masks, the ablation "without the consistency
constraints". The masks are hard in the forward pass and straight-through in the backward pass,
so a pruned channel still gets a gradient and can come back ("dynamic").
``ChannelGates.follow_budget``, called before every training step, keeps the masks within a FLOPs
budget whose ceiling comes down from 1 to the target over the first ``BUDGET_REACH`` of the run,
while ``distill`` trains the gates (at ``lr × vitslim_lr_scale``) with the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from vitslim.adapters import describe, family_of, prepare_for_replacement
from vitslim.adapters.base import BlockSpec, ModelFamily, ViTSpec
from vitslim.cait.flops import block_flops, linear_flops
from vitslim.errors import VitslimError
from vitslim.train import LR_SCALE_ATTR

logger = logging.getLogger("vitslim")

GATES_ATTR = "vitslim_gates"  # the gates are a submodule, so optimisers and checkpoints see them
# The budget schedule (ChannelGates.follow_budget). The allowed FLOPs ratio follows a cubic from 1
# down to the target, reached after this fraction of the run's steps whatever its length, so the
# distillation still has the rest of the run to recover from the last channels pruned. A cubic
# prunes most while the model is closest to the teacher and slows as it nears the target.
BUDGET_REACH = 0.4
# Logits start at ``init`` plus up to this much, ranked within each gate tensor by weight
# importance (``channel_scores``): the first channels pruned, before the distillation has told
# gates apart, are the least important by weights. Smaller than a gate's optimiser step at the
# peak learning rate, so the distillation overrides it within the first steps.
PRIOR_SPREAD = 1e-3


@dataclass(frozen=True)
class GatedBlock:
    """One block's shape and which of its parts carry gates."""

    index: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    attention: bool
    mlp: bool

    def flops(self, tokens: int, width, hidden):
        """The block's matmul FLOPs (``cait.flops``) at a per-head width ``width`` and ``hidden``
        MLP units: q/k/v projections, attention logits and weighted sum, output projection, fc1
        and fc2."""
        channels = self.num_heads * width
        linear = (3 * linear_flops(self.embed_dim, channels) + linear_flops(channels, self.embed_dim)
                  + linear_flops(self.embed_dim, hidden) + linear_flops(hidden, self.embed_dim))
        return block_flops(tokens, linear, channels)


class ChannelGates(nn.Module):
    """Gate logits per block: ``qk[i]`` and ``v[i]`` (``head_dim`` entries, or
    ``num_heads·head_dim`` when not ``consistent``) and ``mlp[i]`` (one per hidden unit).

    Every logit is a 1-D parameter, so ``distill`` gives it no weight decay, and carries
    ``vitslim_lr_scale``: the ranking of the gates must be able to change within a short
    fine-tune. A mask keeps the channels whose logit is above ``threshold`` (0 until
    ``follow_budget`` moves it). ``tokens`` is the number of tokens each block processes, for
    the FLOPs estimate.
    """

    def __init__(self, blocks: list[GatedBlock], *, tokens: int, consistent: bool = True, init: float = 3.0,
                 lr_scale: float = 100.0, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise VitslimError(f"the gate temperature must be above 0 (got {temperature})")
        self.blocks = list(blocks)
        self.tokens = int(tokens)
        self.consistent = bool(consistent)
        self.lr_scale = float(lr_scale)
        self.temperature = float(temperature)
        self.qk, self.v, self.mlp = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        # masks keep the channels whose logit is above the threshold; follow_budget moves it
        self.register_buffer("threshold", torch.tensor(0.0))
        for block in self.blocks:
            key = str(block.index)
            if block.attention:
                width = block.head_dim if self.consistent else block.num_heads * block.head_dim
                self.qk[key] = nn.Parameter(torch.full((width,), float(init)))
                self.v[key] = nn.Parameter(torch.full((width,), float(init)))
            if block.mlp:
                self.mlp[key] = nn.Parameter(torch.full((block.mlp_hidden,), float(init)))
        self._tag()

    def _tag(self) -> None:
        for parameter in self.parameters():
            setattr(parameter, LR_SCALE_ATTR, self.lr_scale)

    def __setstate__(self, state: dict) -> None:
        """A deep copy (or unpickling) rebuilds parameters without their attributes; tag them again."""
        super().__setstate__(state)
        self._tag()

    def _straight_through(self, logit: torch.Tensor) -> torch.Tensor:
        """The hard 0/1 mask in the forward pass, the gradient of a sigmoid centred on the
        threshold in the backward pass (so the channels nearest to being swapped learn most)."""
        soft = torch.sigmoid((logit - self.threshold) / self.temperature)
        return (logit > self.threshold).to(soft.dtype) + (soft - soft.detach())

    def _per_head(self, block: GatedBlock, values: torch.Tensor) -> torch.Tensor:
        """A qk or v tensor as (num_heads, head_dim): shared rows when consistent."""
        if self.consistent:
            return values.expand(block.num_heads, block.head_dim)
        return values.view(block.num_heads, block.head_dim)

    def head_mask(self, block: GatedBlock, kind: str) -> torch.Tensor:
        """The straight-through ``kind`` ("qk" or "v") mask of ``block``, (num_heads, head_dim)."""
        return self._per_head(block, self._straight_through(getattr(self, kind)[str(block.index)]))

    def flat_mask(self, block: GatedBlock, kind: str) -> torch.Tensor:
        """The straight-through mask in the order of a projection's output channels (head after
        head) for "qk" and "v", or of the hidden units for "mlp"."""
        if kind == "mlp":
            return self._straight_through(self.mlp[str(block.index)])
        return self.head_mask(block, kind).reshape(-1)

    def masks(self) -> dict[str, dict[str, torch.Tensor]]:
        """The hard masks now, by block index: boolean ``qk`` and ``v`` of shape (num_heads,
        head_dim) and ``mlp`` of shape (hidden,), for the gated parts; what
        ``slice_channels(masks=...)`` takes."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for block in self.blocks:
                key, entry = str(block.index), {}
                if block.attention:
                    entry["qk"] = self._per_head(block, self.qk[key] > self.threshold).clone()
                    entry["v"] = self._per_head(block, self.v[key] > self.threshold).clone()
                if block.mlp:
                    entry["mlp"] = self.mlp[key] > self.threshold
                if entry:
                    found[key] = entry
        return found

    def kept(self) -> dict[str, dict[str, list[int] | int]]:
        """Kept channel counts by block index: per head for ``qk`` and ``v``, in all for ``mlp``."""
        return {key: {kind: int(mask.sum()) if kind == "mlp" else mask.sum(-1).tolist() for kind, mask in entry.items()}
                for key, entry in self.masks().items()}

    def flops_ratio(self, tokens: list[int] | None = None) -> torch.Tensor:
        """Estimated FLOPs of the blocks' channel-dependent matmuls with the current masks, over
        the same with every channel kept; differentiable through the straight-through masks.

        It is the cost of the model ``slice_channels`` would make: there every head keeps the
        widest head's width, the larger of its query/key and value counts (at least 1), and an
        MLP at least one unit, so those maxima are what the estimate counts. ``tokens[b]`` is
        the number of tokens block ``b`` processes (default: the model's full count in every
        block); parts without gates count as fully kept.
        """
        return self._ratio(self._token_counts(tokens))

    def _ratio(self, counts: list[int], minimal: bool = False, level: torch.Tensor | None = None):
        """The FLOPs ratio at the current masks (differentiable), with every gated channel pruned
        (``minimal``), or with the hard masks a threshold at ``level`` would give."""
        kept, dense = 0.0, 0.0
        for block, n in zip(self.blocks, counts):
            width, hidden = block.head_dim, block.mlp_hidden
            if block.attention:
                # float64 here and below: large models' FLOPs counts lose their last digits in float32
                if minimal:
                    width = 1
                elif level is None:
                    width = torch.stack([self.head_mask(block, kind).sum(-1) for kind in ("qk", "v")]).amax().clamp(min=1).double()
                else:
                    width = torch.stack([self._per_head(block, getattr(self, kind)[str(block.index)] > level).sum(-1)
                                         for kind in ("qk", "v")]).amax().clamp(min=1).double()
            if block.mlp:
                if minimal:
                    hidden = 1
                elif level is None:
                    hidden = self.flat_mask(block, "mlp").sum().clamp(min=1).double()
                else:
                    hidden = (self.mlp[str(block.index)] > level).sum().clamp(min=1).double()
            kept = kept + block.flops(n, width, hidden)
            dense += block.flops(n, block.head_dim, block.mlp_hidden)
        return kept / dense

    def ceiling(self, target_ratio: float, steps: int | None, step: int) -> float:
        """The FLOPs ratio allowed at ``step`` of a run of ``steps``: 1 at the first step, down a
        cubic to ``target_ratio`` at ``BUDGET_REACH`` of the run and there after (``steps`` None:
        the target from the first step)."""
        if steps is None:
            return target_ratio
        reach = max(1.0, BUDGET_REACH * steps)
        return target_ratio + (1 - target_ratio) * (1 - min(1.0, step / reach)) ** 3

    @torch.no_grad()
    def follow_budget(self, target_ratio: float, tokens: list[int] | None = None, step: int = 0, steps: int | None = None) -> float:
        """Move the threshold so the masks keep the most channels whose FLOPs ratio stays within
        the ``ceiling`` of ``step`` (of ``steps``); return that ceiling. Called before every
        training step (``distill(..., before_step=lambda m, step, steps: gates.follow_budget(r,
        step=step, steps=steps))``).

        The budget is a constraint the masks meet at every step, not a penalty traded against the
        distillation: a penalty's push had to win against the distillation's pull on every gate,
        and either lost on short runs (no channel pruned in 125 steps) or won on all gates at
        once (every channel pruned in 32). Here the schedule decides how many channels are
        pruned and when, the distillation which ones: it ranks the logits, the threshold cuts
        the ranking. A pruned channel whose logit rises above a kept one's comes back.
        """
        if not 0 < target_ratio <= 1:
            raise VitslimError(f"the FLOPs target must be a ratio in (0, 1], got {target_ratio}")
        counts = self._token_counts(tokens)
        floor = float(self._ratio(counts, minimal=True))
        if target_ratio < floor:
            raise VitslimError(f"a FLOPs ratio of {target_ratio} is out of reach: with every gated channel pruned the "
                               f"blocks keep {floor:.3f} of their FLOPs (the parts without gates stay dense)")
        ceiling = self.ceiling(target_ratio, steps, step)
        # candidate thresholds: below every logit, then each distinct logit (keeping those above
        # it); the ratio falls as the threshold rises, so bisect for the lowest within the ceiling
        levels = torch.cat([logit.detach().flatten() for logit in self.parameters()]).unique()
        levels = torch.cat([levels[:1] - 1, levels])
        low, high = 0, len(levels) - 1  # the highest level prunes every gated channel: always within
        while low < high:
            middle = (low + high) // 2
            if float(self._ratio(counts, level=levels[middle])) <= ceiling:
                high = middle
            else:
                low = middle + 1
        self.threshold.copy_(levels[low])
        return ceiling

    def prefer(self, scores: dict[str, dict[str, torch.Tensor]]) -> None:
        """Add up to ``PRIOR_SPREAD`` to the logits, ranked by ``scores`` (by block index, kind:
        one score per gate, as ``channel_scores`` gives them) within each gate
        tensor, so that ties between logits go to the more important channel."""
        with torch.no_grad():
            for kind, logits in (("qk", self.qk), ("v", self.v), ("mlp", self.mlp)):
                for key, logit in logits.items():
                    score = scores.get(key, {}).get(kind)
                    if score is None:
                        continue
                    score = score.reshape(-1) if score.numel() == logit.numel() else score.reshape(-1, logit.numel()).sum(0)
                    ranks = score.argsort().argsort().to(logit.dtype)
                    logit += PRIOR_SPREAD * ranks / max(1, logit.numel() - 1)

    def _token_counts(self, tokens: list[int] | None) -> list[int]:
        if tokens is None:
            return [self.tokens] * len(self.blocks)
        if len(tokens) != len(self.blocks):
            raise VitslimError(f"give one token count per block: the model has {len(self.blocks)} blocks, got {len(tokens)} counts")
        return [int(n) for n in tokens]


class _MaskHook:
    """Multiplies a layer's output (forward hook) or fc2's input (pre-hook) by a block's current
    masks, concatenated in ``kinds`` order. An object rather than a closure so that a deep copy
    of the model gets hooks that read the copied gates, and so ``detach_gates`` can find them."""

    def __init__(self, gates: ChannelGates, block: GatedBlock, kinds: tuple[str, ...]) -> None:
        self.gates, self.block, self.kinds = gates, block, kinds

    def __call__(self, module: nn.Module, args: tuple, *output):
        mask = torch.cat([self.gates.flat_mask(self.block, kind) for kind in self.kinds])
        if output:
            return output[0] * mask.to(output[0].dtype)
        # fc2's input: masking the hidden unit itself is exact whatever the activation is
        return (args[0] * mask.to(args[0].dtype), *args[1:])


def channel_pruning_obstacles(family: ModelFamily, block: BlockSpec) -> dict[str, str]:
    """Why masking and slicing a part ("attention", "mlp") of ``block`` would not be exact: such a
    part gets no gates, no importance mask, and refuses masks given to ``slice_channels``."""
    found = dict(family.channel_pruning_obstacles(block))
    attn = block.attention
    if attn.layout == "packed":  # unpack_attention leaves one packed only where it cannot compute the same unpacked
        found.setdefault("attention", "a packed nn.MultiheadAttention reads in_proj_weight directly, so its channels cannot be masked or "
                                      "sliced (attach_gates and slice_channels unpack it, unless it uses add_bias_kv or add_zero_attn)")
    elif not all(isinstance(layer, nn.Linear) for layer in (attn.qkv, attn.q, attn.k, attn.v, attn.out_proj) if layer is not None):
        found.setdefault("attention", "its projections are no longer plain nn.Linear; prune channels before low-rank or int8 compression")
    if not (isinstance(block.mlp.fc1, nn.Linear) and isinstance(block.mlp.fc2, nn.Linear)):
        found.setdefault("mlp", "its layers are no longer plain nn.Linear; prune channels before low-rank or int8 compression")
    elif block.mlp.fc1.out_features != block.mlp.fc2.in_features:
        found.setdefault("mlp", "fc1's outputs are not fc2's inputs one to one (a gated MLP)")
    return found


def _qkv_rows(attention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value projection weights, each (heads·head_dim, embed)."""
    if attention.layout == "qkv":
        return attention.qkv.weight.detach().chunk(3, dim=0)
    return attention.q.weight.detach(), attention.k.weight.detach(), attention.v.weight.detach()


def channel_scores(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Weight importance of every sliceable channel, by block index: ``qk`` and ``v`` of shape
    (heads, head_dim), a query/key channel by ‖q row‖·‖k row‖, a value channel by ‖v row‖·‖proj
    column‖, and ``mlp`` (hidden,), a unit by ‖fc1 row‖·‖fc2 column‖."""
    spec, family = describe(model), family_of(model)
    scores = {}
    for block in spec.blocks:
        problems, entry = channel_pruning_obstacles(family, block), {}
        if "attention" not in problems:
            attention = block.attention
            heads, width = attention.num_heads, attention.head_dim
            q, k, v = (rows.norm(dim=1).reshape(heads, width) for rows in _qkv_rows(attention))
            proj = attention.out_proj.weight.detach().norm(dim=0).reshape(heads, width)
            entry["qk"], entry["v"] = q * k, v * proj
        if "mlp" not in problems:
            fc1, fc2 = block.mlp.fc1.weight.detach(), block.mlp.fc2.weight.detach()
            entry["mlp"] = fc1.norm(dim=1) * fc2.norm(dim=0)
        if entry:
            scores[str(block.index)] = entry
    return scores


def _geometry(spec: ViTSpec, block: BlockSpec, attention: bool, mlp: bool) -> GatedBlock:
    return GatedBlock(index=block.index, embed_dim=spec.embed_dim, num_heads=block.attention.num_heads,
                      head_dim=block.attention.head_dim, mlp_hidden=block.mlp.fc1.out_features, attention=attention, mlp=mlp)


def attach_gates(model: nn.Module, *, consistent: bool = True, init: float = 3.0, lr_scale: float = 100.0,
                 temperature: float = 1.0, prune_attention: bool = True, prune_mlp: bool = True) -> ChannelGates:
    """Add channel gates to ``model`` (in place) as the submodule ``vitslim_gates`` and hook them
    into its forward pass; return them.

    With ``prune_attention``, a packed ``nn.MultiheadAttention`` is first unpacked (a recipe step,
    see ``adapters.torch_nn.unpack_attention``) so its query/key and value channels can be gated. A
    part that cannot be pruned exactly (q/k norm, a norm inside the MLP, layers already factorised
    or quantised) is left dense, with a warning on the ``vitslim`` logger; ``VitslimError`` when
    nothing at all can be gated. With ``init > 0`` every mask starts at 1 and the model computes
    exactly what it did before (an attention unpacked here, to float rounding: its attention runs
    through SDPA instead of torch's fused kernel). Logits within a gate tensor start ranked by
    weight importance (``channel_scores``, ``PRIOR_SPREAD``).
    """
    if isinstance(getattr(model, GATES_ATTR, None), ChannelGates):
        raise VitslimError("this model already carries channel gates; slice_channels or detach_gates them first")
    family = family_of(model)
    if prune_attention:
        family.unpack_attention(model)
    spec = describe(model)
    wanted = {"attention": prune_attention, "mlp": prune_mlp}
    blocks, skipped = [], {}
    for block in spec.blocks:
        problems = channel_pruning_obstacles(family, block)
        for part, reason in problems.items():
            if wanted[part]:
                skipped.setdefault((part, reason), []).append(str(block.index))
        blocks.append(_geometry(spec, block, prune_attention and "attention" not in problems, prune_mlp and "mlp" not in problems))
    for (part, reason), indices in skipped.items():
        logger.warning(f"channel gates: {part} of block{'s' if len(indices) > 1 else ''} {', '.join(indices)} left dense: {reason}")
    if not any(block.attention or block.mlp for block in blocks):
        reasons = "; ".join(f"{part}: {reason}" for part, reason in skipped) or "prune_attention and prune_mlp are both off"
        raise VitslimError(f"no channel of this model can be gated ({reasons})")
    prepare_for_replacement(model)  # torch.nn's fused encoder kernel would bypass the hooked Linears
    device = next(model.parameters()).device
    gates = ChannelGates(blocks, tokens=spec.num_prefix_tokens + spec.num_patches, consistent=consistent, init=init,
                         lr_scale=lr_scale, temperature=temperature).to(device)
    gates.prefer(channel_scores(model))
    setattr(model, GATES_ATTR, gates)
    for block, gated in zip(spec.blocks, blocks):
        attn = block.attention
        if gated.attention and attn.layout == "qkv":
            attn.qkv.register_forward_hook(_MaskHook(gates, gated, ("qk", "qk", "v")))
        elif gated.attention:
            for layer, kind in ((attn.q, "qk"), (attn.k, "qk"), (attn.v, "v")):
                layer.register_forward_hook(_MaskHook(gates, gated, (kind,)))
        if gated.mlp:
            block.mlp.fc2.register_forward_pre_hook(_MaskHook(gates, gated, ("mlp",)))
    return gates


def detach_gates(model: nn.Module) -> ChannelGates:
    """Remove the gates and their hooks from ``model``, which then computes what it did before
    ``attach_gates``; return the gates. An attention ``attach_gates`` unpacked stays unpacked (the
    same function, and its recipe step says so, so the model still saves and reloads).

    The hooks are found by their type rather than through stored handles: in a deep copy of a
    gated model, handles copied along would still point at the original model's hooks.
    """
    gates = getattr(model, GATES_ATTR, None)
    if not isinstance(gates, ChannelGates):
        raise VitslimError("this model carries no channel gates (attach_gates adds them)")
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [key for key, hook in hooks.items() if isinstance(hook, _MaskHook) and hook.gates is gates]:
                del hooks[key]
    delattr(model, GATES_ATTR)
    return gates
