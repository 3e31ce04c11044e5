"""Makes tests/ importable (tiny_models, shared_data) from unit and integration tests alike; under CI, prints each
failure when it happens; under .ci/run, ends the summary with CI's wall time so far."""

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


def pytest_runtest_logreport(report):
    """A timeout ends the whole session (timeout_method = thread, so that a hang in C code ends too) before the
    summary is printed: under CI, each failure's report is printed when it happens."""
    if report.failed and os.environ.get("CI") == "true":
        reporter = _config.pluginmanager.get_plugin("terminalreporter")
        reporter.write("\n")
        reporter.write_sep("_", f"{report.nodeid} failed ({report.when})")
        reporter.write_line(report.longreprtext)


def pytest_configure(config):
    global _config
    _config = config


_config = None
