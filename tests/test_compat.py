import logging
import subprocess
import sys

import pytest

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


def test_missing_op_error_declares_a_placeholder_once(monkeypatch, caplog):
    """The fallback engages on exactly the mismatch error, declares the op, retries, and says so
    once (vitslim and timm both import torchvision through it)."""
    import builtins

    real_import = builtins.__import__
    attempts = []
    declared = []

    def mismatched(name, *args, **kwargs):
        if name == "torchvision":
            attempts.append(name)
            if len(attempts) == 1:
                raise RuntimeError("operator torchvision::fake_op_for_test does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", mismatched)
    monkeypatch.setattr(_compat, "_forget_torchvision", lambda: None)
    monkeypatch.setattr(_compat, "_declare_placeholder", lambda op: (declared.append(op), _compat._placeholders.append(op)))
    monkeypatch.setattr(_compat, "_placeholders", [])
    with caplog.at_level(logging.INFO, logger="vitslim"):
        assert _compat.import_torchvision() is not None
        assert _compat.import_torchvision() is not None
    assert declared == ["fake_op_for_test"] and len(attempts) == 3
    assert [record.message.count("fake_op_for_test") for record in caplog.records] == [1]
