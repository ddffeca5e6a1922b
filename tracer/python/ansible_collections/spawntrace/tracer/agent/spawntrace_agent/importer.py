# Imports the agent's package from the sources the payload carries (wire.py), so that nothing of
# it is written to the target's disk. This file's source is the payload's first part: it runs as
# the `__main__` of `python -c <first stage>` before any of the package exists.
import linecache
import sys


class SourceImporter(object):
    """A meta path finder and loader for the modules of `sources` ({name: (is_package, source)});
    their code is compiled as `<payload>/NAME.py` (with the source in linecache, so that
    tracebacks in the agent's log show it)."""

    def __init__(self, sources):
        self.sources = sources

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.sources:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(fullname, self, is_package=self.sources[fullname][0])

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        is_package, source = self.sources[module.__name__]
        filename = "<payload>/%s.py" % module.__name__.replace(".", "/")
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)


def load(sources):
    """Imports every module of `sources` now; sys.meta_path is as it was afterwards (the modules
    the agent runs see the interpreter's own import system)."""
    importer = SourceImporter(sources)
    sys.meta_path.insert(0, importer)
    try:
        for name in sorted(sources):
            __import__(name)
    finally:
        sys.meta_path.remove(importer)
