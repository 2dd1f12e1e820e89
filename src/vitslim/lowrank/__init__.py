"""Activation-aware mixed-rank low-rank compression (arXiv 2402.06004); see DESIGN.md §1.1.

Work in progress: the math (whitened SVD with closed-form error curves, budgeted mixed-rank
allocation) and the factorised layer are here; calibration, error compensation and the
``compress`` command build on them.
"""
