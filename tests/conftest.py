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
# what the compression pipelines run on (test_cait_compress, test_compose, test_distributed,
# test_sweep): 8x8 patches of 4 pixels (65 tokens, enough to merge), head_dim 16, 3 blocks
COMPRESSIBLE = dict(img_size=32, patch_size=4, depth=3, embed_dim=48, num_heads=3, num_classes=3)


def tiny_vit(seed: int | None = 0, *, name: str = "deit_tiny_patch16_224", **overrides) -> torch.nn.Module:
    """A fresh tiny timm ViT (random init), in eval mode: ``timm.create_model(name, **TINY)`` with
    ``overrides`` replacing any of TINY's geometry or adding other model arguments (``init_values``,
    ``reg_tokens``, ``qk_norm``, ...).

    The geometry is overridable because one size does not fit every test: token merging needs more
    tokens (4-pixel patches: 64 instead of 16), the channel-pruning tests count masks over several
    heads of 16 channels (3 heads, embed_dim 48), low-rank and int8 want Linears that hold most of
    the parameters (embed_dim 64), distillation runs fastest on 16-pixel images, and shape checks
    need a teacher that differs from its student (num_classes, img_size).

    ``name`` picks the timm architecture, and with it the ``pretrained_cfg`` that vitslim reads
    preprocessing from: "deit_tiny_patch16_224" normalises with the ImageNet mean/std,
    "vit_tiny_patch16_224" with 0.5, and some tests depend on which; "deit_tiny_distilled_patch16_224"
    adds a distillation token. The geometry overrides every size the name implies.

    ``seed`` is passed to ``torch.manual_seed`` before building; ``None`` leaves torch's global
    generator as it stands, for the tests that never seeded their models (and, for example, build
    two in a row that must differ).
    """
    if seed is not None:
        torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **overrides}).eval()


def outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the model's adapter calls its output (logits, a map, features) for ``images``, without autograd."""
    with torch.no_grad():
        return vitslim.describe(model).output(images)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| over the whole batch."""
    return float((output - reference).norm() / reference.norm())


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
