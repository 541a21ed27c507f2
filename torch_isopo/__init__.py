"""torch_isopo: Isometric Policy Optimization as a one-line optimizer wrapper."""
from .layers import GenericRuleWarning
from .optimizer import ISOPO
from .surrogate import surrogate_weights
from .check import CheckError, CheckResult, check

__all__ = ["ISOPO", "GenericRuleWarning", "surrogate_weights", "check", "CheckError",
           "CheckResult"]
__version__ = "0.1.0"
