"""The drills reuse the end-to-end suite's fixtures rather than copies of them.

tests/e2e/conftest.py is loaded here under its own module name and its fixtures
(`io_backend`, `start_gateway`) and report hooks (stderr of failed tests, skips failing
under CI=true) are re-exported, so a drill's gateway is started, parametrized over the
I/O backends and checked at teardown exactly like every e2e test's. The helpers the
drills share live in `drill.py`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

E2E = Path(__file__).resolve().parents[1] / "e2e"
# smtpwire and mboxrd, which the e2e conftest imports.
sys.path.insert(0, str(E2E))

_spec = importlib.util.spec_from_file_location("e2e_conftest", E2E / "conftest.py")
e2e_conftest = importlib.util.module_from_spec(_spec)
sys.modules["e2e_conftest"] = e2e_conftest
_spec.loader.exec_module(e2e_conftest)

# Fixtures and hooks: pytest registers whatever a conftest module holds by name.
io_backend = e2e_conftest.io_backend
start_gateway = e2e_conftest.start_gateway
pytest_runtest_makereport = e2e_conftest.pytest_runtest_makereport
pytest_make_collect_report = e2e_conftest.pytest_make_collect_report
