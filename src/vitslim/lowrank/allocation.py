"""Mixed-rank allocation: which layers keep how many components under one parameter budget.

**Stated** (arXiv 2402.06004): ranks differ per layer and only some layers are approximated.

**Our reading**: every component i of layer l removes output error σ²_{l,i}; normalised by the
layer's total energy (optionally times a per-layer sensitivity weight) it is that layer's share
of error removed, and it costs m+n parameters (one column of the up factor, one row of the down
factor). Greedy picks the components with the most normalised error removed per parameter, over
all layers at once. Because σ² is sorted descending inside a layer, this is the Lagrangian
solution of a separable convex problem: no other allocation of the same cost removes more
normalised error. A layer whose rank reaches the break-even mn/(m+n) would cost as much as the
dense matrix, so it stays dense.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerCost:
    name: str
    out_features: int
    in_features: int
    energy: torch.Tensor  # σ², descending
    weight: float = 1.0  # sensitivity: how much this layer's relative error matters

    @property
    def per_rank(self) -> int:
        return self.out_features + self.in_features

    @property
    def dense(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class LayerPlan:
    name: str
    rank: int | None  # None: stays dense
    params: int  # weight parameters it will store (bias not included)
    kept_energy: float  # fraction of σ² kept (1.0 when dense)


def _normalised_gains(layer: LayerCost) -> torch.Tensor:
    total = float(layer.energy.sum())
    if total <= 0:
        return torch.zeros_like(layer.energy, dtype=torch.float64)
    return layer.energy.double() * (layer.weight / total)


def _next_step(layer: LayerCost, gains: torch.Tensor, rank: int, multiple: int) -> tuple[float, int, int | None] | None:
    """(score, cost, new rank or None for dense) of layer's next group, or None when it is full."""
    size = min(multiple, layer.energy.numel() - rank)
    if size <= 0:
        return None
    if (rank + size) * layer.per_rank >= layer.dense:  # past break-even: dense keeps everything
        cost, gain, new_rank = layer.dense - rank * layer.per_rank, float(gains[rank:].sum()), None
    else:
        cost, gain, new_rank = size * layer.per_rank, float(gains[rank:rank + size].sum()), rank + size
    return gain / max(cost, 1), cost, new_rank


def allocate(layers: list[LayerCost], budget: int, *, rank_multiple: int = 1, min_rank: int = 0) -> list[LayerPlan]:
    """Ranks for ``layers`` whose weights together cost at most ``budget`` parameters.

    Components are taken in groups of ``rank_multiple`` (ranks are then multiples of it, which
    keeps matmuls efficient), each group scored by normalised energy per parameter. Every layer
    starts at ``min_rank`` (a factorised layer needs at least one component).
    """
    if rank_multiple < 1:
        raise ValueError("rank_multiple must be at least 1")
    if budget < 0:
        raise ValueError("the budget must not be negative")
    gains = [_normalised_gains(layer) for layer in layers]
    ranks: list[int | None] = [min(min_rank, layer.energy.numel()) for layer in layers]  # None once dense
    spent = sum(rank * layer.per_rank for rank, layer in zip(ranks, layers))
    if spent > budget:
        raise ValueError(f"the budget {budget} is below the {spent} parameters of rank {min_rank} everywhere")
    heap = []
    for index, layer in enumerate(layers):
        step = _next_step(layer, gains[index], ranks[index], rank_multiple)
        if step is not None:
            heap.append((-step[0], index))
    heapq.heapify(heap)
    while heap:
        _, index = heapq.heappop(heap)
        _, cost, new_rank = _next_step(layers[index], gains[index], ranks[index], rank_multiple)
        if spent + cost > budget:
            continue  # does not fit; cheaper groups of other layers still may
        spent += cost
        ranks[index] = new_rank
        if new_rank is not None:
            step = _next_step(layers[index], gains[index], new_rank, rank_multiple)
            if step is not None:
                heapq.heappush(heap, (-step[0], index))
    plans = []
    for layer, rank in zip(layers, ranks):
        if rank is None:
            plans.append(LayerPlan(layer.name, None, layer.dense, 1.0))
        else:
            total = float(layer.energy.sum())
            kept = float(layer.energy[:rank].sum()) / total if total > 0 else 1.0
            plans.append(LayerPlan(layer.name, rank, rank * layer.per_rank, kept))
    return plans


def normalised_error(layers: list[LayerCost], plans: list[LayerPlan]) -> float:
    """Σ_l weight_l · (error left in layer l / its total energy): what ``allocate`` minimises."""
    total = 0.0
    for layer, plan in zip(layers, plans):
        if plan.rank is not None:
            total += float(_normalised_gains(layer)[plan.rank:].sum())
    return total


def uniform(layers: list[LayerCost], budget: int, *, rank_multiple: int = 1, min_rank: int = 0) -> list[LayerPlan]:
    """Baseline: the same fraction of each layer's break-even rank everywhere, the largest that fits."""
    def plans_at(fraction: float) -> list[LayerPlan]:
        out = []
        for layer in layers:
            full = layer.dense // layer.per_rank
            rank = int(fraction * full) // rank_multiple * rank_multiple
            rank = min(max(rank, min_rank), layer.energy.numel())
            total = float(layer.energy.sum())
            out.append(LayerPlan(layer.name, rank, rank * layer.per_rank, float(layer.energy[:rank].sum()) / total if total > 0 else 1.0))
        return out

    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        if sum(p.params for p in plans_at(middle)) <= budget:
            low = middle
        else:
            high = middle
    return plans_at(low)
