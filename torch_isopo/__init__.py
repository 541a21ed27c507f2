"""torch_isopo: Isometric Policy Optimization as a one-line optimizer wrapper."""
from .layers import GenericRuleWarning
from .optimizer import ISOPO
from .surrogate import surrogate_weights
from .check import CheckError, CheckResult, check
from .diagnostics import log_diagnostics

__all__ = ["ISOPO", "GenericRuleWarning", "surrogate_weights", "check", "CheckError",
           "CheckResult", "log_diagnostics"]
__version__ = "0.1.0"
