"""Quantization: calibration data recorded from real pipeline runs, and the ONNX int8 recipes."""
