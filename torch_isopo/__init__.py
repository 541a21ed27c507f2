"""torch_isopo: Isometric Policy Optimization as a one-line optimizer wrapper."""
from .layers import GenericRuleWarning
from .optimizer import ISOPO
from .check import CheckError, CheckResult, check

__all__ = ["ISOPO", "GenericRuleWarning", "check", "CheckError", "CheckResult"]
__version__ = "0.1.0"
