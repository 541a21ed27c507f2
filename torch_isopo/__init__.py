"""torch_isopo: Isometric Policy Optimization as a one-line optimizer wrapper."""
from .layers import GenericRuleWarning
from .optimizer import ISOPO

__all__ = ["ISOPO", "GenericRuleWarning"]
__version__ = "0.1.0"
