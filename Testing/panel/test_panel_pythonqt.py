"""The panel scenarios (panel_scenarios.py) under Slicer's own PythonQt: the host of ../shared/pythonqt embeds the
PythonQt of Slicer 5.10 and, with PQHOST_SLICER=5.8, the exact commit Slicer 5.8 pins, on Qt 5.15, offscreen, its
main thread keeping the GIL while idle as Slicer's does. One host process per build runs every scenario against
real servers in this process (loopback ports) and a real slicer-core scene in the host; each scenario is a test here.

Where the host cannot run this skips with the reason, except in CI (CI=true), where that is a failure. `make test`
installs the host's runtime packages when missing (tools/pythonqt_runtime.sh)."""

from __future__ import annotations

import json
import os

import pytest
from panel_scenarios import SCENARIOS
from pythonqt_host import BUILDS, ROOT, run_script, unavailable_reason

SCRIPT = ROOT / "Testing" / "panel" / "host_panel_scenarios.py"
pytest_plugins = ["panel_fixtures"]  # the servers, ct_phantom_path and small_dicom_dir fixtures


@pytest.fixture(scope="module")
def host_ready():
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def servers(host_ready, servers):
    """The panel tests' own servers (panel_fixtures, one set per session: the tiny MiniGPT-Med loads once)."""
    return servers


@pytest.fixture(scope="module", params=BUILDS, ids=[f"slicer{b}" for b in BUILDS])
def host_run(request, servers, ct_phantom_path, small_dicom_dir, tmp_path_factory):
    started = servers.slow.started
    config = tmp_path_factory.mktemp("pqhost") / "config.json"
    config.write_text(
        json.dumps(
            {
                "urls": servers.urls,
                "volume": str(ct_phantom_path),
                "tmp_dir": str(config.parent),
                "dicom_dir": small_dicom_dir,
                "only": None,
            }
        )
    )
    out = run_script(SCRIPT, request.param, [str(config)], timeout_s=240)
    out["slow_requests"] = servers.slow.started - started
    return out


def test_the_host_runs_the_panel_on_pythonqt(host_run):
    """PythonQt was picked (no Qt 6 binding loaded into the Qt 5 process) and no traceback came from a Qt callback
    (PQHOST_STRICT=1 turns one into exit status 1)."""
    assert host_run["pythonqt"] is True and host_run["modules"] == [], host_run["modules"]
    assert host_run["_returncode"] == 0, host_run["_stderr"]
    assert "Traceback" not in host_run["_stderr"], host_run["_stderr"]
    # timeout, responsiveness, negative control and cancel each reached the slow engine
    assert host_run["slow_requests"] >= 4, host_run["slow_requests"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_panel_scenario_under_pythonqt(host_run, name):
    r = host_run["results"][name]
    assert r["ok"], f"Slicer {host_run['build']}: {name} failed:\n{r['error']}"


def test_every_scenario_also_runs_under_pyside6():
    """Written once: each scenario the host runs is also called by a pytest-qt test (test_panel_*.py)."""
    import ast

    called = set()
    for path in (ROOT / "Testing" / "panel").glob("test_panel_*.py"):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "PS":
                called.add(n.attr)
    assert set(SCENARIOS) <= called, set(SCENARIOS) - called
