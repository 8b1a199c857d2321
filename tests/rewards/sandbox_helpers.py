"""Helpers shared by the sandbox tests."""

from __future__ import annotations

import os


def live_in_pid_namespace(ns: str) -> list[int]:
    """Pids of the processes, zombies excluded, whose PID namespace link reads ``ns`` (e.g. ``pid:[4026532xyz]``)."""
    live = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in "ZX":
                live.append(int(entry))
    return live
