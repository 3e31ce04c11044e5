"""Makes tests/ importable (tiny_models, shared_data) from unit and integration tests alike; under .ci/run, ends
the summary with CI's wall time so far."""

from __future__ import annotations

import os
import time


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    started = os.environ.get("RAYTUNE_FT_CI_STARTED_AT")
    if started:
        seconds = time.time() - float(started)
        terminalreporter.write_line(
            f"CI wall time since .ci/run started (set-up, lint, tests): {seconds:.0f} s ({seconds / 60:.1f} min)"
        )
