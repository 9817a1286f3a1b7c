"""Prefect flows: short functions that call tasks in order, decisions visible."""

import os

# How long to wait for a Prefect server this process starts: the ephemeral API, which Prefect starts on first
# use and waits 20 s for by default (short on a busy laptop, where it failed a command), and `prefect server`
# for schedules. Set before any flow module imports Prefect, which reads its settings once; a value the user
# set is kept, except that `watch.start_ephemeral_api` never waits less (it also covers a process that
# imported Prefect before `flows`).
STARTUP_TIMEOUT_S = 120
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(STARTUP_TIMEOUT_S))
