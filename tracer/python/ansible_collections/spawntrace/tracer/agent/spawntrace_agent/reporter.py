# Attribution datagrams to spawntrace's channel (tracer/python/PROTOCOL.md): the agent's
# agent_start and runner_start, and the connection plugins' runner_start for remote runners.
from __future__ import absolute_import

import errno
import json
import os
import socket
import time


class Reporter(object):
    def __init__(self, path):
        self.path = path
        self.sock = None
        self.dropped = 0
        self.errors = 0
        self.usable = bool(path)

    def send(self, ev, **fields):
        if not self.usable:
            return False
        try:
            msg = {"v": 1, "ev": ev, "ts": time.monotonic_ns() if hasattr(time, "monotonic_ns") else int(time.monotonic() * 1e9)}
            msg["pid"] = os.getpid()
            msg["dropped"] = self.dropped
            msg["errors"] = self.errors
            msg.update(fields)
            data = json.dumps(msg, separators=(",", ":"), default=str).encode("utf-8", "replace")
            if self.sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    s.connect(self.path)
                except OSError as e:
                    s.close()
                    if e.errno in (errno.EACCES, errno.EPERM):
                        self.usable = False  # e.g. an agent running as another (become) user
                    raise
                s.settimeout(0.05)
                self.sock = s
            self.sock.send(data)
            return True
        except socket.timeout:
            self.dropped += 1
        except OSError as e:
            self.dropped += 1
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS) and self.sock is not None:
                self.sock.close()
                self.sock = None
        except Exception:
            self.errors += 1
        return False
