"""Measuring a model against the original: accuracy and fidelity, the objective every
candidate is judged by, size and FLOPs, and speed in the runtime the user deploys on."""
