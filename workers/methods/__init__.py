"""Balancing methods, one module per family, each registered by name (``workers.methods.base``).

Importing this package imports every module in this folder, which registers its methods: a new
method is one more file here plus its test (README, "Adding a method").
"""
import importlib
import pkgutil

from workers.methods.base import (
    Method,
    MethodSection,
    StrictModel,
    get_method,
    lazy_module,
    method_names,
    method_sections,
    register_method,
    run_param_keys,
    unimodal_methods,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Method", "MethodSection", "StrictModel", "get_method", "lazy_module", "method_names", "method_sections",
           "register_method", "run_param_keys", "unimodal_methods"]
