"""Measurement tools: the CPU benchmark against the PyTorch reference (`benchmark`), the GPU
check (`gpu_check`), the server state by algorithm and N (`state_size`) and the conv-kernel
timings (`conv_ops`). Each is run as `python -m experiments.bench.<tool>`."""
