"""The GLM-4.x model in PyTorch: knows tensors only, not files, sequences or HTTP."""
