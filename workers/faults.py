"""Named crash points for the fault-injection suite.

`CCARCHIVE_FAULT_FILE` names a file holding one crash point name (e.g. `finalize:writing`).
The first process that reaches that point removes the file and kills itself with SIGKILL,
exactly like an OOM kill or a pulled plug: no cleanup, no exception handlers. Removing the
file first makes the fault fire once, however many workers race to it. Unset (always, in
production) this costs one environment lookup per call.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "load:read",  # files read, chunk not yet written
    "load:staged",  # chunk written, manifest not yet returned
    "finalize:writing",  # Parquet temp file half written
    "finalize:committed",  # archive published, nothing deleted yet
    "delete:partial",  # some of a host's archived files deleted
)


def crash_point(name: str) -> None:
    """Die here (SIGKILL) if the fault file asks for this point; otherwise do nothing."""
    path = os.environ.get("CCARCHIVE_FAULT_FILE")
    if not path:
        return
    try:
        with open(path, encoding="utf-8") as f:
            wanted = f.read().strip()
    except OSError:
        return
    if wanted != name:
        return
    try:
        os.unlink(path)  # claim the fault: only one process may die for it
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
