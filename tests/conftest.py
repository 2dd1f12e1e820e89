"""Import vitslim before any test module imports timm: vitslim guards the torchvision/torch
build mismatch that otherwise breaks ``import timm`` on some installs (see vitslim._compat)."""

# ruff: noqa: I001 (vitslim must come first)
import vitslim

import pytest
import timm
import torch
from PIL import Image

# the tiny timm ViT the tests share: 4x4 patches of 8 pixels, 2 blocks, 3 classes
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    """A fresh tiny timm DeiT (random init from ``seed``), in eval mode."""
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", **{**TINY, **overrides}).eval()


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """The tiny ViT saved as a vitslim folder."""
    return vitslim.save(tiny_vit(), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory):
    """12 random 40x40 PNGs in three class folders (a, b, c)."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for label in ("a", "b", "c"):
        (root / label).mkdir()
        for index in range(4):
            pixels = (torch.rand(40, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    return root
