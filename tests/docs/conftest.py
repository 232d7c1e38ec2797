from __future__ import annotations

import pytest

from tests.docs.markdown_commands import REPORT_KEY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The documentation commands' report (every command, its time, what was not run and why), when the
    documentation test ran in this session."""
    report = config.stash.get(REPORT_KEY, None)
    if report:
        terminalreporter.section("documentation commands")
        for line in report:
            terminalreporter.write_line(line)
