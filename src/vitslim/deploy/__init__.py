"""Deployment: int8 weights and matmuls in PyTorch, and checked ONNX / torch.export files."""
