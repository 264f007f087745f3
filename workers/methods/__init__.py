"""Balancing methods, one module per family, each registered by name (``workers.methods.base``).

Importing this package registers every built-in method; a new method is one more module here,
imported below, plus its test (README, "Adding a method").
"""
from workers.methods.base import (
    Method,
    MethodSection,
    StrictModel,
    get_method,
    method_names,
    method_sections,
    register_method,
    unimodal_methods,
)
from workers.methods import supervised, ogm, gblend, avslowfast, avid  # noqa: E402,F401  (registration)

__all__ = ["Method", "MethodSection", "StrictModel", "get_method", "method_names", "method_sections",
           "register_method", "unimodal_methods"]
