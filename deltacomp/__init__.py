"""deltacomp: compress the delta between a fine-tuned model and its base.

Heavy dependencies (torch, transformers, huggingface_hub) load lazily: ``import deltacomp`` stays fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "DeltacompError"]

from deltacomp.errors import DeltacompError  # noqa: E402
