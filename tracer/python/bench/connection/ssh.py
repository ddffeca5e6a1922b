"""The `ssh` connection of the benchmark's lower bound: see ../bound.py."""
from __future__ import annotations

import importlib.util
import os
import sys

_name = "spawntrace_bench_bound"
_bound = sys.modules.get(_name)
if _bound is None:
    _spec = importlib.util.spec_from_file_location(_name, os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "bound.py"))
    _bound = importlib.util.module_from_spec(_spec)
    sys.modules[_name] = _bound
    _spec.loader.exec_module(_bound)

_builtin = _bound.builtin("ssh")
DOCUMENTATION = _builtin.DOCUMENTATION  # the builtin's options (read from the imported module)


class Connection(_bound.BoundMixin, _builtin.Connection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bound_files = {}
