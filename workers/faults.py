"""Named crash points for the fault-injection suite.

`CCARCHIVE_FAULT_FILE` names a file holding one crash point name (e.g. `finalize:writing`).
The first process that reaches that point removes the file and kills itself with SIGKILL,
exactly like an OOM kill or a pulled plug: no cleanup, no exception handlers. Removing the
file first makes the fault fire once, however many workers race to it. Unset (always, in
production) this costs one environment lookup per call.

`stall <point>` instead of a point name makes the first process there wait: it removes the
fault file, writes its pid to `<fault file>.stalled` and sleeps until a test deletes that
file (or STALL_LIMIT_SECONDS pass). That is how the distributed suite holds a run at a
known stage while it restarts Redis, cuts S3 off or starts a second run.
"""

from __future__ import annotations

import os
import signal
import time

POINTS = (
    "load:read",  # files read, chunk not yet written
    "load:staged",  # chunk written, manifest not yet returned
    "finalize:writing",  # Parquet temp file half written
    "finalize:committed",  # archive published, nothing deleted yet
    "delete:partial",  # some of a host's archived files deleted
)

#: A stalled process goes on by itself after this long: a test that died must not leave
#: workers hanging forever.
STALL_LIMIT_SECONDS = 300.0


def crash_point(name: str) -> None:
    """Die here (SIGKILL) or stall if the fault file asks for this point; else do nothing."""
    path = os.environ.get("CCARCHIVE_FAULT_FILE")
    if not path:
        return
    try:
        with open(path, encoding="utf-8") as f:
            wanted = f.read().strip()
    except OSError:
        return
    action, _, point = wanted.rpartition(" ")
    if point != name or action not in ("", "stall"):
        return
    try:
        os.unlink(path)  # claim the fault: only one process may act on it
    except FileNotFoundError:
        return
    if action == "stall":
        _stall(path + ".stalled")
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _stall(marker: str) -> None:
    """Announce the stall in `marker` and wait until someone deletes it."""
    with open(marker + ".tmp", "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    os.replace(marker + ".tmp", marker)  # appears complete: the test may read the pid
    deadline = time.monotonic() + STALL_LIMIT_SECONDS
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
