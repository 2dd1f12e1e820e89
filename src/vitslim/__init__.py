"""vitslim: compress pretrained Vision Transformers and prove the result.

Public API: ``load_model``, ``save``, ``describe``, ``evaluate``, ``benchmark``, ``open_images`` (images
from a folder, zip or CSV, transformed for a model); ``compress``, the one way to compress (the
pipeline every method runs in: method, optional KD recovery, optional int8), with a method's config
(``LowRank``, its baselines ``SVD``, ``ASVD`` and ``SVDLLM``, ``Cait``, ``LowRankCait``: all axes under one
target; ``vitslim.methods``) and ``Training`` (one training run's settings); ``distill`` (KD
recovery fine-tune), ``quantize_int8``, ``export_onnx``, ``export_program`` (torch.export). Under ``torchrun``,
calibration, distillation and evaluation share the work across processes (``vitslim._infra.distributed``).
"""

from vitslim._compat import import_torchvision

import_torchvision()  # before anything imports timm; see vitslim._compat

__version__ = "0.5.0"

from vitslim.adapters import describe  # noqa: E402
from vitslim.cait.compress import Cait  # noqa: E402
from vitslim.deploy.export import export_onnx, export_program  # noqa: E402
from vitslim.deploy.quantize import quantize_int8  # noqa: E402
from vitslim.errors import VitslimError  # noqa: E402
from vitslim.io.image_sources import open_images  # noqa: E402
from vitslim.io.loading import load_model  # noqa: E402
from vitslim.io.persist import save  # noqa: E402
from vitslim.lowrank.compress import ASVD, SVD, SVDLLM, LowRank  # noqa: E402
from vitslim.lowrank_cait import LowRankCait  # noqa: E402
from vitslim.measure.bench import benchmark  # noqa: E402
from vitslim.measure.evaluate import evaluate  # noqa: E402
from vitslim.pipeline import compress  # noqa: E402
from vitslim.train import Training, distill  # noqa: E402

__all__ = ["ASVD", "SVD", "SVDLLM", "Cait", "LowRank", "LowRankCait", "Training", "VitslimError", "benchmark", "compress", "describe", "distill",
           "evaluate", "export_onnx", "export_program", "load_model", "open_images", "quantize_int8", "save", "__version__"]
