"""sdexport's run side: numpy + one inference backend, no PyTorch.

Importing ``runtime`` loads only numpy-level code; the pipeline and its backends load on first use.
"""

__all__ = ["Pipeline"]


def __getattr__(name):
    if name == "Pipeline":
        from runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
