"""vitslim: compress pretrained Vision Transformers and prove the result.

Public API: ``load_model``, ``save``, ``describe``, ``evaluate``, ``benchmark``.
"""

from vitslim._compat import import_torchvision

import_torchvision()  # before anything imports timm; see vitslim._compat

__version__ = "0.1.0"

from vitslim.adapters import describe  # noqa: E402
from vitslim.bench import benchmark  # noqa: E402
from vitslim.errors import VitslimError  # noqa: E402
from vitslim.evaluate import evaluate  # noqa: E402
from vitslim.loading import load_model  # noqa: E402
from vitslim.persist import save  # noqa: E402

__all__ = ["VitslimError", "benchmark", "describe", "evaluate", "load_model", "save", "__version__"]
