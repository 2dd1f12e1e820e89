"""Activation-aware mixed-rank low-rank compression (arXiv 2402.06004); our reading of it is in
docs/methods-lowrank.md.

The math is in plain functions over tensors (``whitening``: whitened SVD with closed-form error
curves; ``allocation``: budgeted mixed-rank allocation); ``calibration``, ``sensitivity`` and
``compensation`` gather what it needs from a model; ``compress`` puts them together, and
``vitslim.methods.lowrank`` registers the method.
"""
