# The zygote's warm state: what every runner it forks starts with already imported and compiled.
from __future__ import absolute_import

import contextlib
import os
import sys
import time

from .ansiballz import CODE_CACHE, KEPT_ZIPS, cache_zip_source, install_code_cache, memo_module_code, split_payload
from .isolation import module_fqn
from .safe_paths import create_file


@contextlib.contextmanager
def first_on_sys_path(path):
    """`path` first on sys.path for the block's imports only."""
    sys.path.insert(0, path)
    try:
        yield
    finally:
        try:
            sys.path.remove(path)
        except ValueError:
            pass


class DynPath(list):
    """__path__ of a warm `ansible.*` package: the module_utils zips the current payload put on
    sys.path first (so modules not yet imported come from this run's zip), then the warm zip."""

    def __init__(self, rel, fixed, warm_zips):
        list.__init__(self, fixed)
        self.rel = rel
        self.fixed = list(fixed)
        self.warm_zips = warm_zips

    def __iter__(self):
        extra = [p + "/" + self.rel for p in sys.path if isinstance(p, str) and p.endswith(".zip") and p not in self.warm_zips]
        return iter(extra + self.fixed)


class WarmState(object):
    """What the zygote keeps warm for the runners it forks (see pool.py): ansible's module_utils
    imported from the first payload's zip (warm), then, per module new to it, the wrapper and
    module compiled and the module_utils its zip brings imported (learn), and that zip kept on
    disk for runners to run from (ansiballz.fast_ansiballz_main). The agent keeps its own copy of
    `version` and `learned` (from the zygote's messages) to know what to ask for."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.version = None  # the ansible-core version warmed for; False: not warmed (tried, or off)
        self.zips = set()  # warm-*.zip files the warm packages import from
        self.payload_zips = set()  # see _keep_payload_zip
        self.learned = set()  # modules learnt
        self.unwarmable = set()  # module_utils that failed to import

    def directory(self):
        return self.cfg.get("dir") or os.path.dirname(self.cfg["socket"])

    def cleanup(self):
        """Removes the zip files this state wrote."""
        for z in self.zips | self.payload_zips:
            try:
                os.unlink(z)
            except OSError:
                pass

    def warm(self, req, payload):
        version = req.get("ansible_version")
        if self.version is not None or not version or not req.get("warm", True):
            return
        self.version = False  # one attempt
        i = payload.rfind(b"zip_data='")
        j = payload.find(b"'", i + 10) if i >= 0 else -1
        if i < 0 or j < 0:
            return
        import base64

        try:
            data = base64.b64decode(payload[i + 10 : j])
        except Exception:
            return
        path = self._keep_zip(data, "warm-%d.zip" % os.getpid())
        before = set(sys.modules)
        with first_on_sys_path(path):
            try:
                import importlib

                # what every AnsiballZ wrapper imports from the standard library (zipfile decodes
                # member names with cp437), then ansible's own entry points
                for name in ("base64", "shutil", "tempfile", "zipfile", "runpy", "encodings.cp437", "resource"):
                    try:
                        importlib.import_module(name)
                    except ImportError:
                        pass
                for name in ("ansible.module_utils.basic", "ansible.module_utils._internal._ansiballz._loader"):
                    try:
                        importlib.import_module(name)
                    except ImportError:
                        pass
            except Exception:
                # a half-imported ansible is worse than none
                for name in set(sys.modules) - before:
                    if name == "ansible" or name.startswith("ansible."):
                        del sys.modules[name]
                return
        self._dynamic_paths()
        install_code_cache()
        # tempfile finds its directory by creating a test file, once per process: do it here for
        # runners whose environment names the same candidates (see Runner.run_one)
        import tempfile

        try:
            tempfile.gettempdir()
        except Exception:
            pass
        self.version = version
        import gc

        gc.collect()
        if hasattr(gc, "freeze"):
            gc.freeze()

    def learn(self, req, payload):
        """After a reply (off the critical path): compile this payload's wrapper and module once,
        and import the module_utils its zip carries that are not warm yet, so that the next
        runners fork with them."""
        if not self.version or req.get("ansible_version") != self.version:
            return
        module = req.get("module")
        if not module or module in self.learned:
            return
        self.learned.add(module)
        parts = split_payload(payload)
        if parts is None:
            return
        import base64
        import hashlib
        import io
        import zipfile

        head, _, data, _ = parts
        key = ("head", hashlib.sha1(head).hexdigest())
        if key not in CODE_CACHE:
            CODE_CACHE[key] = compile(head, "<stdin>", "exec", dont_inherit=True)
        raw = base64.b64decode(data)
        zf = zipfile.ZipFile(io.BytesIO(raw))
        utils = []
        for name in zf.namelist():
            if not name.endswith(".py"):
                continue
            mod = name[:-3].replace("/", ".")
            if mod.endswith(".__init__"):
                mod = mod[: -len(".__init__")]
            if mod.startswith("ansible.module_utils.") or mod == "ansible.module_utils":
                if mod not in sys.modules and mod not in self.unwarmable:
                    utils.append(mod)
            elif mod == "ansible.modules" or mod.startswith("ansible.modules.") or mod.startswith("ansible_collections."):
                cache_zip_source(name, zf.read(name))
        if utils:
            self._import_from_zip(raw, sorted(utils))
        fqn = module_fqn(payload)
        parts = fqn.split(".") if fqn else []
        # the module and its packages as runpy imports them (those not warm already)
        names = [n for n in (".".join(parts[: i + 1]) for i in range(len(parts))) if n not in sys.modules]
        self._keep_payload_zip(module, data, raw, names)
        import gc

        if hasattr(gc, "freeze"):
            gc.freeze()

    def _keep_payload_zip(self, module, data, raw, names=()):
        """Writes this payload's zip once, as the AnsiballZ wrapper would (with its sitecustomize),
        at a path that lasts as long as the agent, and reads its directory now: runners of later
        payloads carrying the same zip run from it (see _fast_ansiballz_main), with `names` (the
        module and its packages) looked up in it already (ansiballz.memo_module_code)."""
        import hashlib
        import zipfile
        import zipimport

        d = self.directory()
        sha = hashlib.sha1(data).hexdigest()
        short = "".join(c if c.isalnum() or c == "_" else "_" for c in module.rsplit(".", 1)[-1])[:40]
        path = os.path.join(d, "ansible_%s_payload-%d-%s.zip" % (short, os.getpid(), sha[:16]))
        try:
            fd = create_file(path, os.O_RDWR)
            self.payload_zips.add(path)
            with os.fdopen(fd, "r+b") as f:
                f.write(raw)
                f.seek(0)
                with zipfile.ZipFile(f, mode="a") as z:
                    zinfo = zipfile.ZipInfo()
                    zinfo.filename = "sitecustomize.py"
                    zinfo.date_time = time.gmtime()[:6]
                    z.writestr(zinfo, ('import sys\nsys.path.insert(0, "%s")\n' % path).encode("utf-8"))
            sys.path_importer_cache[path] = zipimport.zipimporter(path)
        except Exception:
            return
        CODE_CACHE[("payload", sha)] = path
        KEPT_ZIPS.add(path)
        memo_module_code(path, names)

    def _import_from_zip(self, raw, names):
        path = self._keep_zip(raw, "warm-%d-%d.zip" % (os.getpid(), len(self.zips)))
        import importlib

        with first_on_sys_path(path):
            for name in names:
                if name in sys.modules:
                    continue
                before = set(sys.modules)
                try:
                    importlib.import_module(name)
                except BaseException:
                    self.unwarmable.add(name)
                    for n in set(sys.modules) - before:
                        del sys.modules[n]
        self._dynamic_paths()

    def _keep_zip(self, data, name):
        """Writes `data` as a zip the warm modules keep importing from (their __path__ names it),
        in this agent's directory, and returns its path."""
        path = os.path.join(self.directory(), name)
        fd = create_file(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.zips.add(path)
        return path

    def _dynamic_paths(self):
        for name, mod in list(sys.modules.items()):
            if (name == "ansible" or name.startswith("ansible.")) and type(getattr(mod, "__path__", None)) is list:
                mod.__path__ = DynPath(name.replace(".", "/"), mod.__path__, self.zips)
