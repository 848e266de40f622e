"""Measurement against PyTorch: latency (bench), precision cost (quality), timing and machine description."""
