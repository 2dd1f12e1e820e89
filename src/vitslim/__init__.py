"""vitslim: compress pretrained Vision Transformers and prove the result."""

from vitslim._compat import import_torchvision

import_torchvision()  # before anything imports timm; see vitslim._compat

__version__ = "0.1.0"
