"""Quantization: calibration, HAQ/RTN W8A8, integer kernels, checkpoints, evaluation."""
