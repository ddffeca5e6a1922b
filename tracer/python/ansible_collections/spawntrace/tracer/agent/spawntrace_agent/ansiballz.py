# AnsiballZ payloads: splitting a wrapper from its zip (so that a loop's items send the zip once,
# and the wrapper's code is compiled once), the compiled-code cache shared with forked runners,
# and the fast `_ansiballz_main` that runs a module from a zip kept on disk.
from __future__ import absolute_import

import os
import sys

from .framing import ProtocolError

_MAIN_MARK = b'\nif __name__ == "__main__":\n'
_ZIP_MARK = b"zip_data='"


def split_payload(payload):
    """An AnsiballZ wrapper as (head source, tail source with the zip literal replaced by a name,
    the zip's base64 text, head line count), or None. The head (the wrapper's code, identical for
    every task of an ansible-core version) can then be compiled once, and the 100+ KB literal need
    not be tokenized per task."""
    i = payload.rfind(_MAIN_MARK)
    if i < 0:
        return None
    j = payload.find(_ZIP_MARK, i)
    if j < 0 or payload.find(_ZIP_MARK, j + 1) >= 0:
        return None
    k = payload.find(b"'", j + len(_ZIP_MARK))
    if k < 0:
        return None
    data = payload[j + len(_ZIP_MARK) : k]
    if b"\\" in data or b"\n" in data:
        return None
    head = payload[:i]
    tail = payload[i:j] + _ZIP_NAME + payload[k + 1 :]
    return head, tail, data, head.count(b"\n")


_ZIP_NAME = b"zip_data=__spawntrace_zip_data"


def strip_payload(payload):
    """(the payload without its zip literal, the zip's base64 text) or None: what a client sends
    when the agent may have that zip already (`zip_sha`), as every item of a loop carries the
    same one. `unstrip_payload` gives the payload back byte for byte."""
    parts = split_payload(payload)
    if parts is None or payload.count(_ZIP_NAME):
        return None
    head, tail, data, _ = parts
    return head + tail, data


def unstrip_payload(stripped, data):
    i = stripped.rfind(_ZIP_NAME)
    if i < 0 or stripped.count(_ZIP_NAME) != 1:
        raise ProtocolError("no zip place in a stripped payload")
    return b"".join((stripped[:i], _ZIP_MARK, data, b"'", stripped[i + len(_ZIP_NAME) :]))


# Compiled code shared with forked runners: ("head", sha1) -> an AnsiballZ wrapper's code;
# ("zip", path inside the zip, sha1 of the source) -> code of a module a payload's zip provides
# (zipimport compiles from source each time, twice per import on 3.11/3.12).
CODE_CACHE = {}


# Zips the agent wrote and never changes (WarmState._keep_payload_zip): what zipimport finds in
# them is looked up once per runner, or once in the zygote for every runner (see
# install_code_cache, memo_module_code).
KEPT_ZIPS = set()
_MODULE_CODE = {}  # (archive, prefix, fullname) -> zipimport._get_module_code's answer


def with_filename(code, filename):
    """`code` with co_filename set to `filename`, nested code objects included."""
    try:
        consts = tuple(with_filename(c, filename) if hasattr(c, "co_filename") else c for c in code.co_consts)
        return code.replace(co_filename=filename, co_consts=consts)
    except Exception:
        return code


def _zip_inner(pathname):
    i = pathname.find(".zip/")
    return pathname[i + 5 :] if i >= 0 else None


def install_code_cache():
    import hashlib
    import zipimport

    orig = getattr(zipimport, "_compile_source", None)
    if orig is None or getattr(zipimport, "_spawntrace_orig_compile_source", None) is not None:
        return

    named = {}  # (cache key, pathname) -> the code with that filename: a shared runner's next run

    def _compile_source(pathname, source):
        if CODE_CACHE:
            inner = _zip_inner(pathname)
            if inner is not None:
                key = ("zip", inner, hashlib.sha1(source).hexdigest())
                code = named.get((key, pathname))
                if code is None:
                    code = CODE_CACHE.get(key)
                    if code is not None:
                        if len(named) >= 256:
                            named.clear()
                        code = named[(key, pathname)] = with_filename(code, pathname)
                if code is not None:
                    return code
        return orig(pathname, source)

    zipimport._spawntrace_orig_compile_source = orig
    zipimport._compile_source = _compile_source

    # zipimport reads, decompresses and compiles a module twice per import (find_spec asks for
    # its file name through the same function as get_code): once per kept zip and name instead
    orig_get = getattr(zipimport, "_get_module_code", None)
    if orig_get is not None:

        def _get_module_code(self, fullname):
            key = (getattr(self, "archive", None), getattr(self, "prefix", None), fullname)
            if key[0] not in KEPT_ZIPS:
                return orig_get(self, fullname)
            found = _MODULE_CODE.get(key)
            if found is None:
                found = _MODULE_CODE[key] = orig_get(self, fullname)
            return found

        zipimport._get_module_code = _get_module_code


def memo_module_code(path, names):
    """Looks `names` up in kept zip `path` now, as imports find them (each through the
    zipimporter of its package's directory in the zip): in the zygote, once for every runner."""
    import zipimport

    get = getattr(zipimport, "_get_module_code", None)
    if get is None or getattr(zipimport, "_spawntrace_orig_compile_source", None) is None:
        return
    for name in names:
        parent = name.split(".")[:-1]
        try:
            get(zipimport.zipimporter("/".join([path] + parent)), name)
        except Exception:
            pass


def cache_zip_source(inner, source):
    import hashlib
    import zipimport

    key = ("zip", inner, hashlib.sha1(source).hexdigest())
    if key not in CODE_CACHE:
        compile_source = getattr(zipimport, "_spawntrace_orig_compile_source", None)
        if compile_source is not None:
            try:
                CODE_CACHE[key] = compile_source("<zip>/" + inner, source)
            except SyntaxError:
                pass


_WRAPPER_ARGS = ("zip_data", "ansible_module", "module_fqn", "params", "profile", "date_time", "extensions", "rlimit_nofile")


def fast_ansiballz_main(ns, modlib_path):
    """Replaces the `_ansiballz_main` an AnsiballZ wrapper (ansible-core 2.19+) just defined in
    `ns` with one that runs the module from `modlib_path`, the same zip the payload carries
    already written out with the wrapper's sitecustomize (see WarmState._keep_payload_zip), instead
    of decoding and writing it to a fresh temporary directory each time. Every other step is the
    wrapper's own: working directory check, RLIMIT_NOFILE, sys.path cleaning, then
    `_loader.run_module`. The wrapper's debug subcommands (explode/execute) and wrappers of any
    other shape keep the original."""
    orig = ns.get("_ansiballz_main")
    code = getattr(orig, "__code__", None)
    if code is None or code.co_varnames[: code.co_argcount] != _WRAPPER_ARGS or code.co_kwonlyargcount:
        return

    def _ansiballz_main(zip_data, ansible_module, module_fqn, params, profile, date_time, extensions, rlimit_nofile):
        if len(sys.argv) == 2:
            return orig(zip_data, ansible_module, module_fqn, params, profile, date_time, extensions, rlimit_nofile)
        try:
            os.getcwd()
        except OSError:
            try:
                os.chdir(os.path.expanduser("~"))
            except OSError:
                os.chdir("/")
        if rlimit_nofile:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = min(hard, rlimit_nofile)
            if want != soft:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                except ValueError:
                    pass
        scriptdir = None
        try:
            scriptdir = os.path.dirname(os.path.realpath(sys.modules["__main__"].__file__))
        except (AttributeError, OSError):
            pass
        excludes = {"", ".", scriptdir}
        sys.path = [p for p in sys.path if p not in excludes]
        sys.path.insert(0, modlib_path)
        from ansible.module_utils._internal._ansiballz import _loader

        _loader.run_module(
            json_params=params.encode(), profile=profile, module_fqn=module_fqn, modlib_path=modlib_path, extensions=extensions
        )

    ns["_ansiballz_main"] = _ansiballz_main
