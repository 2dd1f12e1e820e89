"""The factorised replacement for an ``nn.Linear``."""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``rank`` Linear as two plain matmuls.

    Two ``nn.Linear`` children (no custom kernels, no materialised product), so it runs under
    ``torch.compile``, exports to ONNX and quantises like any Linear, and it is faster than the
    dense layer whenever rank < in·out/(in+out).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("rank must be at least 1")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> LowRankLinear:
        """Build from ``up`` (out, k) and ``down`` (k, in) so that the weight is ``up @ down``."""
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None)
        with torch.no_grad():
            layer.down.weight.copy_(down.to(dtype))
            layer.up.weight.copy_(up.to(dtype))
            if bias is not None:
                layer.up.bias.copy_(bias.to(dtype))
        return layer.to(device=down.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.up.bias is not None}"
