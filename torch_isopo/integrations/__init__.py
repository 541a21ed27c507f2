"""Integrations of ISOPO with training frameworks.

Each submodule imports its framework, an optional dependency: ``torch_isopo.integrations.trl``
needs the ``[trl]`` extra (``pip install -e ".[trl]"`` from a clone) and Python >= 3.11, as TRL
1.15 does; ``torch_isopo.integrations.sb3`` needs the ``[sb3]`` extra (Stable-Baselines3 and
sb3-contrib).
"""
