"""The `local` connection of the runner benchmark's lower bound: see ../bound.py."""

from __future__ import annotations

import importlib.util
import os
import sys

_bound = sys.modules.get("spawntrace_bench_bound")
if _bound is None:
    _spec = importlib.util.spec_from_file_location(
        "spawntrace_bench_bound", os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "bound.py")
    )
    _bound = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_bound)

DOCUMENTATION, Connection = _bound.plugin("local")  # the loader reads DOCUMENTATION from the module
