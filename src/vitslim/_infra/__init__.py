"""Private infrastructure: atomic writes, progress, devices, torch.distributed, text tables."""
