# The runner: one module run in a forked process (or, in-process, several in a row), with the
# process state the classic `python AnsiballZ_*.py` would have had.
from __future__ import absolute_import

import builtins
import json
import os
import signal
import sys
import time

from .ansiballz import CODE_CACHE, fast_ansiballz_main, split_payload, with_filename
from .framing import HEADER
from .memory import prefault
from .procs import now, open_fds, read_all


class Baseline(object):
    """The process state the classic command would have started with: the agent's, captured once
    when it starts. Every module run starts from it, with its request's environment, working
    directory and umask (Runner.run_one)."""

    def __init__(self):
        self.env = dict(os.environ)
        self.cwd = os.getcwd()
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        self.path = list(sys.path)
        self.stdio = [(s.encoding, s.errors) if s is not None else ("utf-8", "strict") for s in (sys.stdin, sys.stdout, sys.stderr)]


class Runner(object):
    """A forked module runner (see pool.py): `main` waits for its request, runs it in this process
    and reports on its done pipe."""

    def __init__(self, cfg, base, hot, warm_version):
        self.cfg = cfg
        self.base = base  # a Baseline
        self.hot = hot  # memory.HotPages shared with the zygote, or None
        self.warm_version = warm_version  # the ansible-core version the zygote warmed for

    def main(self, req_r, done_w, out_fd, err_fd, in_fd):
        """A spare runner: waits for a request, runs it, reports "rc t_start t_end again why" on
        the done pipe (again: 1 if it may take another request; why: what retires it, or "-"). It then exits, unless the agent let
        the request share its runner (isolation.shares: the request's "share") and the run left
        nothing behind that could leak into the next one (see InProcess)."""
        import atexit

        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        atexit._clear()
        keep = (req_r, done_w, out_fd, err_fd, in_fd)
        for fd in open_fds():
            if fd > 2 and fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.cfg.get("prefault", True):
            prefault(self.hot)
        in_process = InProcess(runs_per_runner(self.cfg))
        while True:
            # wait for the request: one byte on the pipe (EOF: this spare was discarded), the
            # request itself in the memfd
            if not os.read(req_r, 1):
                os._exit(0)
            t_start = now()
            buf = read_all(in_fd)
            head = HEADER.unpack(buf[: HEADER.size])
            req = json.loads(bytes(buf[HEADER.size : HEADER.size + head[0]]).decode("utf-8"))
            payload = bytes(buf[HEADER.size + head[0] :])
            del buf
            in_process.before()
            rc = self.run_one(req, payload, out_fd, err_fd, in_process)
            again = in_process.after(req.get("share"))
            try:
                why = "-" if again else (in_process.why or "-").replace(" ", "+")
                os.write(done_w, b"%d %d %d %d %s\n" % (rc, t_start, now(), 1 if again else 0, why.encode("ascii", "replace")))
            except OSError:
                again = False
            if not again:
                if self.hot is not None:
                    try:
                        self.hot.learn()
                    except Exception:
                        pass
                os._exit(rc)

    def run_one(self, req, payload, out_fd, err_fd, in_process):
        """Runs one module request in this process; returns its exit code (0-255)."""
        import atexit

        # process state the classic command would have had
        env = dict(self.base.env if req.get("env") is None else req["env"])
        env.update(req.get("assign") or {})
        os.environ.clear()
        os.environ.update(env)
        if "tempfile" in sys.modules and (in_process.runs or any(env.get(k) != self.base.env.get(k) for k in ("TMPDIR", "TEMP", "TMP"))):
            sys.modules["tempfile"].tempdir = None  # computed for another environment
        if "TZ" in env or "TZ" in self.base.env:
            try:
                time.tzset()
            except AttributeError:
                pass
        cwd = req.get("cwd")
        try:
            os.chdir(cwd if cwd else self.base.cwd)
        except OSError:
            try:
                os.chdir(self.base.cwd)
            except OSError:
                pass
        umask = req.get("umask")
        os.umask(self.base.umask if umask is None else umask)
        in_process.expect()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        import io

        def stream(fd, mode, enc_err):
            enc, errs = enc_err
            f = io.open(fd, mode + "b", closefd=False)
            return io.TextIOWrapper(f, encoding=enc, errors=errs, line_buffering=False)

        sys.stdin = sys.__stdin__ = stream(0, "r", self.base.stdio[0])
        sys.stdout = sys.__stdout__ = stream(1, "w", self.base.stdio[1])
        sys.stderr = sys.__stderr__ = stream(
            2, "w", ("utf-8" if self.base.stdio[2][0] is None else self.base.stdio[2][0], "backslashreplace")
        )
        if req.get("ansible_version") != self.warm_version:
            in_process.dirty = "another ansible-core"
            for name in list(sys.modules):
                if name == "ansible" or name.startswith("ansible."):
                    del sys.modules[name]
        path = req.get("path")
        rc = 0
        try:
            import types

            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = builtins
            if path:
                main.__file__ = path
                sys.argv = [path]
                sys.path = [os.path.dirname(path)] + self.base.path
            else:
                sys.argv = [""]
                sys.path = [""] + self.base.path
            sys.modules["__main__"] = main
            prof = self.cfg.get("profile")
            if prof:  # diagnostics: a cProfile of each runner, written to that directory
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
                n = in_process.runs
                atexit.register(
                    lambda: (profiler.disable(), profiler.dump_stats(os.path.join(prof, "runner-%d-%d.prof" % (os.getpid(), n))))
                )
            # pipelined payloads run as "<stdin>", file-based ones (no pipelining) as their file
            filename = path or "<stdin>"
            parts = split_payload(payload)
            if parts is None:
                in_process.dirty = "not an AnsiballZ wrapper with a zip literal"
                exec(compile(payload, filename, "exec", dont_inherit=True), main.__dict__)
            else:
                import hashlib

                head_src, tail, data, lines = parts
                head_code = CODE_CACHE.get(("head", hashlib.sha1(head_src).hexdigest()))
                if head_code is None:
                    head_code = compile(head_src, filename, "exec", dont_inherit=True)
                elif path:
                    head_code = with_filename(head_code, filename)
                exec(head_code, main.__dict__)
                # the agent's sha1 of this zip text (it checked or computed it), else computed here
                sha = req.get("zip_sha") or hashlib.sha1(data).hexdigest()
                kept = CODE_CACHE.get(("payload", sha)) if CODE_CACHE else None
                if kept and os.path.exists(kept):
                    fast_ansiballz_main(main.__dict__, kept)
                else:
                    in_process.dirty = "zip not kept"  # imports from a zip that is removed after the run
                main.__dict__["__spawntrace_zip_data"] = data.decode("ascii")
                del payload, parts, data
                exec(compile(b"\n" * lines + tail, filename, "exec", dont_inherit=True), main.__dict__)
        except SystemExit as e:
            rc = _exit_code(e)
        except BaseException:
            # as the interpreter does with an exception a script leaves: sys.excepthook, with the
            # traceback from the payload's own frame (file before 2.19 fails a module from its
            # hook: fail_json, then SystemExit)
            rc = 1
            in_process.dirty = "exception"
            t, v, tb = sys.exc_info()
            tb = tb.tb_next or tb
            try:
                v.__traceback__ = tb  # what the default hook prints, whatever tb it is given
            except Exception:
                pass
            try:
                sys.excepthook(t, v, tb)
            except SystemExit as e:
                rc = _exit_code(e)
            except BaseException:
                import traceback

                try:
                    traceback.print_exception(t, v, tb)
                except Exception:
                    pass
            del t, v, tb
        try:
            import threading

            if threading.active_count() > 1 or not in_process.enabled:
                if threading.active_count() > 1:
                    in_process.dirty = "thread"
                threading._shutdown()
        except Exception:
            in_process.dirty = "thread check failed"
        try:
            atexit._run_exitfuncs()
        except Exception:
            pass
        atexit._clear()
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        return rc & 0xFF


def _exit_code(e):
    """A process's exit status for SystemExit `e`, as the interpreter gives it (a non-integer
    code is printed and means 1)."""
    rc = e.code
    if rc is None:
        return 0
    if not isinstance(rc, int):
        try:
            sys.stderr.write("%s\n" % (rc,))
        except Exception:
            pass
        return 1
    return rc


def runs_per_runner(cfg):
    """How many module runs one runner may serve in a row (agent cfg "runs_per_runner", default
    100): a bound on what a long-lived runner may accumulate that no check sees."""
    return max(1, int(cfg.get("runs_per_runner", 100) or 1))


class InProcess(object):
    """Runs that share a runner (see isolation.py). Before each run it notes the process state a
    module may change; after it, it puts back what the AnsiballZ wrapper itself changes on every
    run (RLIMIT_NOFILE, sys.meta_path/path_hooks and the importer cache, the excepthook, the
    module_utils warning registries, `ansible*` modules the run imported) and says whether the
    runner may take another request. It retires (exits; the next run takes a fresh spare) when the
    request was not to share, after `limit` runs, and after any run that left state it cannot put
    back: an exception, a fork, a thread (Python's or any other), a file descriptor left open, a
    signal handler, alarm or timer, a working directory, environment variable or umask other than
    the request's, an imported module outside the standard library and `ansible*`, a payload whose
    zip is not kept."""

    SIGNALS = [
        s
        for s in (
            getattr(signal, n, None)
            for n in ("SIGALRM", "SIGCHLD", "SIGTERM", "SIGHUP", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGQUIT", "SIGWINCH")
        )
        if s
    ]

    def __init__(self, limit):
        self.limit = limit
        self.enabled = limit > 1
        self.runs = 0
        self.dirty = False
        self.forked = False
        self.why = None  # what retired the runner last (diagnostics, tests)
        if self.enabled:
            self._orig_fork = os.fork
            in_process = self

            def fork():
                in_process.forked = True
                return in_process._orig_fork()

            os.fork = fork

    def before(self):
        self.dirty = False
        self.forked = False
        if not self.enabled:
            return
        self.modules = set(sys.modules)
        self.handlers = dict((s, signal.getsignal(s)) for s in self.SIGNALS)
        self.meta_path = list(sys.meta_path)
        self.importers = set(sys.path_importer_cache)
        self.path_hooks = list(sys.path_hooks)
        self.excepthook = sys.excepthook
        self.fds = set(open_fds())
        try:
            import resource

            self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        except Exception:
            self.nofile = None
        w = sys.modules.get("ansible.module_utils.common.warnings")
        for name in ("_global_warnings", "_global_deprecations"):
            reg = getattr(w, name, None)
            if hasattr(reg, "clear"):
                reg.clear()

    def expect(self):
        """Notes the working directory, environment and umask the request set (run_one)."""
        if not self.enabled:
            return
        try:
            self.cwd = os.getcwd()
        except OSError:
            self.cwd = None
        self.env = dict(os.environ)
        self.umask = os.umask(0o022)
        os.umask(self.umask)

    def after(self, share):
        self.runs += 1
        if not self.enabled or not share:
            return self._retire("not shared")
        if self.dirty or self.forked or self.runs >= self.limit:
            return self._retire("fork" if self.forked else self.dirty or "limit")
        try:
            imported = set(sys.modules) - self.modules
            why = self._left_behind(imported)
            if why:
                return self._retire(why)
            sys.meta_path[:] = self.meta_path
            sys.path_hooks[:] = self.path_hooks
            for key in set(sys.path_importer_cache) - self.importers:
                del sys.path_importer_cache[key]
            sys.excepthook = self.excepthook
            if self.nofile is not None:
                import resource

                if resource.getrlimit(resource.RLIMIT_NOFILE) != self.nofile:
                    resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)
            for name in imported:
                if name != "__main__" and name.split(".", 1)[0] in ("ansible", "ansible_collections"):
                    del sys.modules[name]
            w = sys.modules.get("ansible.module_utils.common.warnings")
            for name in ("_global_warnings", "_global_deprecations"):
                reg = getattr(w, name, None)
                if hasattr(reg, "clear"):
                    reg.clear()
        except Exception as e:
            return self._retire("check failed: %r" % (e,))
        return True

    def _retire(self, why):
        self.why = why
        return False

    def _left_behind(self, imported):
        """What the run changed that a next run would see and that cannot be put back, or None.
        `imported`: the names the run added to sys.modules."""
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = None
        if cwd != self.cwd:
            return "cwd"
        if os.environ != self.env:
            return "environment"
        umask = os.umask(0o022)
        os.umask(umask)
        if umask != self.umask:
            return "umask"
        for s, h in self.handlers.items():
            if signal.getsignal(s) is not h:
                return "signal handler"
        if signal.alarm(0) or signal.getitimer(signal.ITIMER_REAL)[0] or signal.getitimer(signal.ITIMER_VIRTUAL)[0]:
            return "alarm or timer"
        if set(open_fds()) - self.fds:
            return "file descriptor"
        if _threads() > 1:
            return "thread"
        for name in imported:
            if name != "__main__" and not _stdlib_or_ansible(name, sys.modules.get(name)):
                return "module %s" % name
        return None


def _threads():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


_STDLIB_NAMES = getattr(sys, "stdlib_module_names", None)  # Python 3.10+


def _stdlib_or_ansible(name, module):
    """True for a module of the standard library or of ansible (ansible.module_utils, a
    collection's module_utils: removed after each run)."""
    top = name.split(".", 1)[0]
    if top in ("ansible", "ansible_collections"):
        return True
    if _STDLIB_NAMES is not None:
        return top in _STDLIB_NAMES
    f = getattr(module, "__file__", None)
    if not f:
        return (
            module is None
            or top in sys.builtin_module_names
            or getattr(module, "__spec__", None) is None
            or module.__spec__.origin in ("built-in", "frozen")
        )
    import sysconfig

    f = os.path.realpath(f)
    return not ("site-packages" in f or "dist-packages" in f) and any(
        f.startswith(os.path.realpath(sysconfig.get_path(k)) + os.sep) for k in ("stdlib", "platstdlib")
    )
