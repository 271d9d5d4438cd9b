"""Model loading and our plain adapter modules."""
from .loading import load_model

__all__ = ["load_model"]
