"""Running real ansible-playbook (the one of the environment running pytest) the one way every test
does: in a directory of its own with an empty ansible.cfg and none of the caller's ANSIBLE_* or
SPAWNTRACE_* settings, so that only what the test sets applies."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PYTHON_DIR = Path(__file__).resolve().parents[1]

COLLECTION = PYTHON_DIR / "ansible_collections/spawntrace/tracer"
CONNECTION_DIR = COLLECTION / "plugins/connection"
CALLBACK_DIR = COLLECTION / "plugins/callback"
AGENT_DIR = COLLECTION / "agent"
BIN = Path(sys.executable).parent


def core_version() -> tuple[int, int]:
    """The running ansible-core's (major, minor)."""
    from ansible.release import __version__

    return tuple(int(p) for p in __version__.split(".")[:2])


# A callback that writes every result (per item too) as JSON lines to $RESULTS_FILE.
RESULTS_CALLBACK = r"""
from __future__ import annotations
import json, os
from ansible.plugins.callback import CallbackBase

def _plain(v):
    try:
        return json.loads(json.dumps(v, default=str))
    except Exception:
        return str(v)

class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "results_dump"
    CALLBACK_NEEDS_ENABLED = True

    def _w(self, status, result, item=False):
        r = result._result if hasattr(result, "_result") else result.result
        rec = {"task": result.task_name if hasattr(result, "task_name") else result._task.get_name(),
               "host": result._host.get_name() if hasattr(result, "_host") else result.host.get_name(),
               "status": status, "item": item, "result": _plain(dict(r))}
        with open(os.environ["RESULTS_FILE"], "a") as f:
            f.write(json.dumps(rec) + "\n")

    def v2_runner_on_ok(self, result): self._w("ok", result)
    def v2_runner_on_failed(self, result, ignore_errors=False): self._w("failed", result)
    def v2_runner_on_skipped(self, result): self._w("skipped", result)
    def v2_runner_on_unreachable(self, result): self._w("unreachable", result)
    def v2_runner_item_on_ok(self, result): self._w("ok", result, True)
    def v2_runner_item_on_failed(self, result): self._w("failed", result, True)
    def v2_runner_item_on_skipped(self, result): self._w("skipped", result, True)
"""


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    directory: Path
    results: list  # results_dump's records (none when it was not enabled)
    timing: list  # the agent's SPAWNTRACE_AGENT_TIMING records (with agent_timing)

    def by_task(self):
        out = {}
        for r in self.results:
            out.setdefault((r["task"], r["host"], r["item"]), []).append(r)
        return out


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "SPAWNTRACE_"))}
    env.update(extra or {})
    return env


def local_inventory(directory: Path, hosts=("localhost",), python: str = sys.executable) -> Path:
    """directory/inventory.ini: `hosts` on the local connection."""
    path = directory / "inventory.ini"
    path.write_text("".join(f"{h} ansible_connection=local ansible_python_interpreter={python}\n" for h in hosts))
    return path


def run_playbook(
    directory: Path,
    playbook: str,
    *,
    mode: str = "classic",
    inventory: str | Path | None = None,
    args=(),
    env: dict | None = None,
    callbacks=("results_dump",),
    socket_path: str | None = None,
    pipelining: bool = True,
    agent_timing: bool = False,
    wrapper=(),
    timeout: float = 600,
) -> Run:
    """Runs `playbook` (YAML text) from `directory` (made if missing), against `inventory` (by
    default localhost, local connection, this Python).

    mode: classic (ansible-core's connection plugins) or persistent (spawntrace's on
    ANSIBLE_CONNECTION_PLUGINS). callbacks: those enabled, results_dump (the results in
    Run.results) and spawntrace (the plugin under test; `socket_path` is its SPAWNTRACE_SOCKET).
    agent_timing: the agent's per-module records in Run.timing. wrapper: argv run in front of
    ansible-playbook's (strace). `env` comes last."""
    directory.mkdir(parents=True, exist_ok=True)
    pb = directory / "playbook.yml"
    pb.write_text(playbook)
    config = directory / "ansible.cfg"
    config.write_text("")
    results = directory / f"results-{mode}.jsonl"
    timing = directory / f"timing-{mode}.jsonl"
    for f in (results, timing):
        if f.exists():
            f.unlink()
    e = clean_env(
        {
            "ANSIBLE_CONFIG": str(config),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_PIPELINING": "True" if pipelining else "False",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_LOCAL_TEMP": str(directory / "tmp-local"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    plugin_dirs = {"results_dump": directory / "callbacks", "spawntrace": CALLBACK_DIR}
    if callbacks:
        e["ANSIBLE_CALLBACK_PLUGINS"] = ":".join(str(plugin_dirs[c]) for c in callbacks)
        e["ANSIBLE_CALLBACKS_ENABLED"] = ",".join(callbacks)
    if "results_dump" in callbacks:
        plugin_dirs["results_dump"].mkdir(exist_ok=True)
        (plugin_dirs["results_dump"] / "results_dump.py").write_text(RESULTS_CALLBACK)
        e["RESULTS_FILE"] = str(results)
    if socket_path is not None:
        e["SPAWNTRACE_SOCKET"] = socket_path
    if agent_timing:
        e["SPAWNTRACE_AGENT_TIMING"] = str(timing)
    if mode == "persistent":
        e["ANSIBLE_CONNECTION_PLUGINS"] = str(CONNECTION_DIR)
        if os.environ.get("SPAWNTRACE_TEST_ISOLATION"):
            # the whole suite again with another isolation (in-process, fork): same results expected
            e["SPAWNTRACE_ISOLATION"] = os.environ["SPAWNTRACE_TEST_ISOLATION"]
    elif mode != "classic":
        raise ValueError(mode)
    e.update(env or {})
    if inventory is None:
        inventory = local_inventory(directory)
    argv = [*wrapper, str(BIN / "ansible-playbook"), "-i", str(inventory), *args, str(pb)]
    start = time.monotonic()
    p = subprocess.run(argv, env=e, cwd=directory, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - start

    def records(path):
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return Run(p.returncode, p.stdout, p.stderr, seconds, directory, records(results), records(timing))
