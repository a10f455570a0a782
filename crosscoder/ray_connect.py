"""One way to reach Ray for every command: the cluster at ``RAY_ADDRESS``, or a local one.

The harvest and the trainer both start Ray when it is not running, and a ``crosscoder run``
starts it in one and re-uses it in the other, so the two must start the same thing. A local Ray
gets its dashboard on 127.0.0.1 only: Ray Train's controller monitor reads actor states through
the dashboard's state API, and without it logs "Failed to query Ray Train Controller actor state"
every few seconds for the whole run (and could not remove a dead controller's placement group).
The cost is the dashboard's process, ~100 MiB and a second or two at start-up.
"""

from __future__ import annotations

import os
from typing import Any


def connect(num_cpus: int | None = None):
    """``ray``, initialised: at ``RAY_ADDRESS`` if set, else a local Ray with at least ``num_cpus``
    CPUs (the machine's count if more). Does nothing if Ray is already initialised."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"dashboard_host": "127.0.0.1", "log_to_driver": True, "configure_logging": False}
        if not address:
            kwargs["num_cpus"] = max(num_cpus or 0, os.cpu_count() or 1)
        ray.init(address=address, **kwargs)
    return ray
