"""Tiny models for tests: a plain-PyTorch ViT and a Hugging Face ViT, both small enough for CPU."""

from __future__ import annotations

import torch
from torch import nn

import vitslim  # noqa: F401  (import before transformers; see vitslim._compat)


class PlainViT(nn.Module):
    """A ViT made only of torch.nn parts, the way users write one by hand.

    ``num_prefix_tokens`` learned tokens (class first) precede the patches; with none, the head
    pools the mean. ``pos_embed=False`` drops the positional embedding, leaving nothing from which
    the input resolution could be read.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 8,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_dim: int = 64,
        num_classes: int = 10,
        batch_first: bool = True,
        norm_first: bool = True,
        num_prefix_tokens: int = 1,
        pos_embed: bool = True,
    ):
        super().__init__()
        self.batch_first = batch_first
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.prefix_tokens = nn.ParameterList(nn.Parameter(0.02 * torch.randn(1, 1, dim)) for _ in range(num_prefix_tokens))
        tokens = num_prefix_tokens + (img_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim)) if pos_embed else None
        layer = nn.TransformerEncoderLayer(
            dim, heads, mlp_dim, dropout=0.0, batch_first=batch_first, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([token.expand(x.shape[0], -1, -1) for token in self.prefix_tokens] + [x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.batch_first:
            x = self.encoder(x)
        else:
            x = self.encoder(x.transpose(0, 1)).transpose(0, 1)
        x = self.norm(x)
        return self.head(x[:, 0] if len(self.prefix_tokens) else x.mean(dim=1))


def tiny_hf_config(num_labels: int = 10, **overrides):
    from transformers import ViTConfig

    settings = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    return ViTConfig(**{**settings, **overrides})


def tiny_hf_vit(num_labels: int = 10, seed: int = 0, **overrides) -> nn.Module:
    """A seeded ViTForImageClassification: 32x32 images, 8x8 patches, width 32, 2 layers, 2 heads."""
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_hf_config(num_labels, **overrides)).eval()


def write_random_images(root, *, per_class: int, size: int, suffix: str = ".png", classes: int = 3):
    """An ImageFolder of seeded random RGB images (class0, class1, ...); returns ``root``."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in range(classes):
        (root / f"class{label}").mkdir()
        for index in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{label}" / f"{index}{suffix}")
    return root
