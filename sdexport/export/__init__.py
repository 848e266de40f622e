"""One export run: component specs, conversion by a target, parity against torch, the artifact written atomically."""
