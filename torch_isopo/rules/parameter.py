"""Free parameters: those a module holds next to children that have rules of their own.

A Gaussian policy's ``log_std``, a learned position table, a class token: they form one layer
per module, and arbitrary code uses them (not only the module's forward, which keeps running as
written). ``shared.Tracker`` follows them while a microbatch is open and attributes them to
samples where they meet the samples; each sample is one ``fisher`` position.
"""
from __future__ import annotations

from . import Rule


class FreeRule(Rule):
    name = "parameter"
    pieces = "samples"
    patches_forward = False
