"""Integrations of ISOPO with training frameworks.

Each submodule imports its framework, an optional dependency: ``torch_isopo.integrations.trl``
needs the ``[trl]`` extra (``pip install "torch_isopo[trl]"``).
"""
