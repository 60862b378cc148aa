"""MiniGPTMedSlicerLib.local_backend (the module self-test's backend discovery) against a real backend process, and
the Lib's logic doing what the self-test does with it, on a slicer-core scene."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT
from MiniGPTMedSlicerLib import local_backend as LB
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib import scene as S
from MiniGPTMedSlicerLib.logic import AnalysisLogic


@pytest.fixture(scope="module")
def started():
    launcher = LB.find_launcher(sys.executable)
    backend = LB.start_backend(launcher, engine="builtin", cwd=str(ROOT), timeout_s=90)
    yield backend
    backend.stop()


def test_find_launcher_runs_the_backend_cli_with_this_python():
    assert LB.find_launcher(sys.executable) == [sys.executable, "-m", "backend.cli"]


def test_started_backend_serves_its_engine_on_loopback(started):
    assert started.started_here and started.process.poll() is None
    assert started.url.startswith("http://127.0.0.1:")
    assert LB.is_serving(started.url)
    assert LB.is_serving(started.url, engine="builtin")
    assert not LB.is_serving(started.url, engine="minigptmed")


def test_a_serving_backend_is_found_and_not_stopped_by_its_finder(started):
    found = LB.find_or_start_backend(None, url=started.url, engine="builtin")
    assert found is not None and found.url == started.url and not found.started_here
    found.stop()
    assert LB.is_serving(started.url)


def test_nothing_serving_and_no_launcher_is_none():
    assert LB.find_or_start_backend(None, url=f"http://127.0.0.1:{LB.free_port()}") is None
    assert not LB.is_serving("not a url")


def test_a_backend_that_exits_is_reported_with_its_exit_code():
    with pytest.raises(RuntimeError, match="exited with code 3"):
        LB.start_backend([sys.executable, "-c", "import sys; sys.exit(3)"], timeout_s=30)


def test_stop_ends_the_process_it_started():
    with LB.find_or_start_backend(
        LB.find_launcher(sys.executable), url=f"http://127.0.0.1:{LB.free_port()}", cwd=str(ROOT), timeout_s=90
    ) as backend:
        assert backend.started_here and LB.is_serving(backend.url)
    assert backend.process.poll() is not None
    assert not LB.is_serving(backend.url)


def test_logic_analyze_waits_for_the_answer_and_adds_the_rois(started, ct_phantom_path):
    """What the module's self-test does through MiniGPTMedSlicerLogic, here on a slicer-core scene."""
    ctx = S.create_scene()
    try:
        vol = S.load_volume(ctx, str(ct_phantom_path))
        S.add_slice_view(ctx, vol, "Red", "Axial", (256, 192))
        logic = AnalysisLogic(ctx.scene, lambda: dict(ctx.slice_logics))
        logic.configure(started.url, None)
        outcome = logic.analyze("Red", "Detect")
        assert outcome.ok, outcome.message
        assert outcome.n_findings >= 1
        rois = ctx.scene.GetNodesByClass("vtkMRMLMarkupsROINode")
        assert rois.GetNumberOfItems() == outcome.n_findings == len(M.finding_rows(ctx.scene))
        again = logic.analyze("Red", "Detect", keep_previous=False)
        assert again.ok and len(M.list_results(ctx.scene)) == 1
    finally:
        S.close(ctx)
