"""Import vitslim before any test module imports timm: vitslim guards the torchvision/torch
build mismatch that otherwise breaks ``import timm`` on some installs (see vitslim._compat)."""

import vitslim  # noqa: F401
