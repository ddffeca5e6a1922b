# The isolation policy: whether a module run may share its runner process with the module runs
# before and after it (in-process) or gets a fresh runner of its own that exits after it (fork).
#
# A request carries the `spawntrace_isolation` connection option of its task and host:
#   auto        in-process for the builtin modules listed in IN_PROCESS_SAFE, fork for any other
#   in-process  in-process, whatever the module (the user vouches for it, as with Mitogen's default)
#   fork        a fresh runner, used for this run only
# Sharing is never blind: a runner retires after any run that changed process state it cannot
# put back (runner.InProcess), whatever the policy said.
from __future__ import absolute_import

MODES = ("auto", "in-process", "fork")

# Builtin modules that run in-process by default. Each one is run here, in-process and repeated,
# against classic results (tests/test_runner_isolation.py): they keep no module-level state
# between runs, start no threads or processes of their own in the runner, and leave no file
# descriptor, signal handler or working-directory change behind. Only the builtin module of that
# name (`ansible.modules.*`): a `library/copy.py` of the user's is `ansible.legacy.copy`.
IN_PROCESS_SAFE = frozenset(
    "ansible.modules." + name
    for name in (
        "assemble",
        "blockinfile",
        "copy",
        "file",
        "find",
        "lineinfile",
        "ping",
        "replace",
        "slurp",
        "stat",
        "tempfile",
    )
)


def module_fqn(payload):
    """The Python module name an AnsiballZ payload runs (`ansible.modules.copy`,
    `ansible.legacy.mine`, `ansible_collections.ns.coll.plugins.modules.x`), or None. ansible-core
    2.19+ passes it to `_ansiballz_main(module_fqn=...)`; earlier wrappers to
    `runpy.run_module(mod_name=...)`. Neither marker can occur in the zip's base64 text."""
    if not payload:
        return None
    for mark in (b"module_fqn='", b"mod_name='"):
        i = payload.rfind(mark)
        if i >= 0:
            j = payload.find(b"'", i + len(mark), i + len(mark) + 512)
            if j > 0:
                return payload[i + len(mark) : j].decode("ascii", "replace")
    return None


def shares(mode, fqn):
    """True if a run of module `fqn` under isolation `mode` may share its runner."""
    if mode == "in-process":
        return True
    if mode == "fork":
        return False
    return fqn in IN_PROCESS_SAFE
