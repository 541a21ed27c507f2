"""torch_isopo: Isometric Policy Optimization as a one-line optimizer wrapper."""
from .layers import GenericRuleWarning
from .optimizer import ISOPO
from .surrogate import surrogate_weights

__all__ = ["ISOPO", "GenericRuleWarning", "surrogate_weights"]
__version__ = "0.1.0"
