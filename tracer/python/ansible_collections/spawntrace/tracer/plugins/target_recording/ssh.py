# spawntrace's `ssh` connection for traced runs that do not use the persistent agent: exactly
# ansible-core's ssh connection, except that before a worker's first command it asks spawntrace
# to record the target (spawntrace_agent.target_recording).
from __future__ import annotations

import os
import sys

# the agent's package, agent/spawntrace_agent in this collection
_AGENT = os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "agent"))
if _AGENT not in sys.path:
    sys.path.append(_AGENT)

from spawntrace_agent import client, target_recording  # noqa: E402

_builtin_ssh = client.builtin_connection("ssh")

# Same options as the builtin (the loader reads this attribute from the imported module).
DOCUMENTATION = _builtin_ssh.DOCUMENTATION.replace(
    "short_description: connect via SSH client binary",
    "short_description: connect via SSH client binary (targets recorded by spawntrace)",
    1,
)


class Connection(target_recording.RecordTargetMixin, _builtin_ssh.Connection):
    """ansible-core's ssh connection, the target recorded by spawntrace."""
