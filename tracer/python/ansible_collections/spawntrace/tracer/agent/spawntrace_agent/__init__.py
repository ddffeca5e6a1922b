"""spawntrace's persistent agent, one room per concern (standard library only, Python 3.6+,
Linux/POSIX). On a target the agent runs from the payload wire.py builds of every module here but
the controller's own (client, wire); the connection plugins import the rooms they use.

framing     the agent socket's frames and their size limits (both sides)
safe_paths  checks of agent directories and files in shared places (both sides)
shell_ops   shell housekeeping done natively (echo ~, mkdtemp, chmod, rm, test -e)
messages    the attribution messages to spawntrace (PROTOCOL.md): one sender, one method per event
procs       process and file-descriptor helpers
files       put / fetch
ansiballz   AnsiballZ payloads: wrapper/zip split, compiled-code cache, fast main
memory      prefaulting a spare runner's memory
warm        the zygote's warm state (imports and compiled code runners inherit)
runner      one module run in a forked runner; in-process runs
zygote      the fork that keeps the warm state and forks runners
pool        the agent's side of module runs: zygote, spares, runs in flight
server      the agent's poll loop, connections and requests
bootstrap   bind, daemonize, READY line; the agent process's entry point
importer    imports this package from the payload's sources (first part of the payload)
wire        (controller) the payload, its first stage and the agent version
client      (controller) the connection plugins' side: commands, endpoints, bootstrap
target_recording  (controller) asks spawntrace to record an SSH target before the first command
remote_watch  (controller) ends the remote agents with the playbook
"""
