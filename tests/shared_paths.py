"""Where the team's shared data and reference models live, and a skip marker for their absence."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_TEST_ZIP = SHARED / "data" / "cifar10-jpeg" / "test.zip"
IMAGENET_CSV = SHARED / "data" / "imagenet-sample-256" / "labels.csv"
VIT_D6 = SHARED / "models" / "vit-d6-cifar10"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not found: shared data and models are absent on this machine")
