"""sdexport's export side: diffusers models in, artifacts for a target device out."""

__version__ = "0.1.0"
