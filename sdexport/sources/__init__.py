"""Model sources: diffusers folders, single-file checkpoints, LoRAs fused on load, merges."""
