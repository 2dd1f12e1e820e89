import subprocess
import sys

import pytest
import torch

import vitslim_torchvision_guard as guard
from vitslim import _compat


def test_timm_and_transformers_import_in_a_fresh_process():
    code = "import vitslim, timm, transformers; from transformers import ViTForImageClassification; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_other_runtime_errors_propagate(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("CUDA driver too old")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(RuntimeError, match="CUDA driver too old"):
        _compat.import_torchvision()


def test_plain_import_timm_works_in_the_venv():
    """Issue P13 item 1: a user script that imports timm first, in the venv scripts/setup.sh made
    (the .pth file it installs runs vitslim_torchvision_guard at interpreter start)."""
    done = subprocess.run([sys.executable, "-c", "import timm; import torchvision; print('ok')"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_guard_declares_only_missing_unconditional_ops_once():
    """The guard reads which operators _meta_registrations registers without checking, declares
    those not defined, and never one twice (a second import finds them defined)."""
    source = 'torch.library.register_fake("torchvision::fake_op_for_test")\n@register_meta("roi_align")\n'
    assert guard.declare_missing(source) == ["fake_op_for_test"]
    assert guard.declare_missing(source) == []
    assert hasattr(torch.ops.torchvision, "fake_op_for_test") and not hasattr(torch.ops.torchvision, "roi_align_for_test")
    assert guard.placeholders.count("fake_op_for_test") == 1
