"""torch_isopo: Isometric Policy Optimization as a one-line optimizer wrapper."""
from .optimizer import ISOPO

__all__ = ["ISOPO"]
__version__ = "0.1.0"
