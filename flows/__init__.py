"""Prefect flows: short functions that call tasks in order, decisions visible."""

import os

# How long to wait for a Prefect server this process starts: the ephemeral API, which Prefect starts on first
# use and waits 20 s for by default (short on a busy laptop, where it failed a command), and `prefect server`
# for schedules. Set before any flow module imports Prefect, which reads its settings once; a value the user
# set is kept, shorter or longer (`watch.startup_timeout` also covers a process that imported Prefect before
# `flows`).
STARTUP_TIMEOUT_S = 120
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_SET_BY_USER = STARTUP_TIMEOUT_ENV in os.environ
os.environ.setdefault(STARTUP_TIMEOUT_ENV, str(STARTUP_TIMEOUT_S))
