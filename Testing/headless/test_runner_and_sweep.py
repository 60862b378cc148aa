"""The headless runner (as a real subprocess) and volume sweeps on Slicer's MRML with a real backend."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT
from MiniGPTMedSlicerLib import capture as C
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib import scene as S
from MiniGPTMedSlicerLib.client import BackendClient
from MiniGPTMedSlicerLib.geometry import pixel_to_ras
from MiniGPTMedSlicerLib.png import decode_png
from MiniGPTMedSlicerLib.sweep import (
    SweepCancelled,
    analyze_sweep,
    capture_sweep,
    merge_sweep,
    plan_sweep,
)

from backend.engines.builtin import BuiltinEngine
from backend.server_thread import ServerThread, free_port
from headless.sweep import run_sweep


def _runner(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "headless.runner", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_analyze_writes_the_four_outputs(chest_ct_path, tmp_path, builtin_server):
    out = tmp_path / "run"
    r = _runner(
        "analyze",
        str(chest_ct_path),
        "--view",
        "axial",
        "--slice",
        "73",
        "--task",
        "ground",
        "--question",
        "lungs",
        "--backend",
        builtin_server,
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "captured the axial slice" in r.stderr and "wrote" in r.stderr
    data = json.loads((out / "findings.json").read_text())
    assert data["task"] == "ground" and data["engine"] == "builtin" and len(data["findings"]) == 2
    m = np.array(data["pixel_to_ras"])
    png = (out / "input.png").read_bytes()
    img = decode_png(png)
    assert img.shape == (data["image"]["height"], data["image"]["width"]) == (512, 512)
    for f in data["findings"]:
        x0, y0, x1, y1 = f["box_px"]
        assert np.allclose(f["roi_center_ras"], pixel_to_ras(m, (x0 + x1) / 2, (y0 + y1) / 2), atol=1e-3)
        assert f["roi_size_mm"][0] == pytest.approx((x1 - x0) * data["image"]["pixel_spacing_mm"][1], rel=1e-4)
    assert (out / "view.png").stat().st_size > 10_000
    assert (out / "scene.mrb").stat().st_size > 1_000_000
    ctx = S.open_mrb(str(out / "scene.mrb"), str(tmp_path / "unpacked"))
    try:
        assert len(M.finding_rows(ctx.scene)) == len(data["findings"])
    finally:
        S.close(ctx)


@pytest.mark.parametrize(
    "args,message",
    [
        (["analyze", "/nonexistent/volume.nii.gz"], "no such file"),
        (["analyze", "{CT}", "--slice", "500"], "out of range"),
        (["analyze", "{CT}", "--offset", "9999"], "outside the volume"),
        (["analyze", "{RGB}"], "scalar"),
        (["analyze", "{CT}", "--backend", "http://127.0.0.1:{PORT}"], "Is it running?"),
        (["sweep", "{CT}", "--range", "100:900"], "outside"),
    ],
)
def test_runner_errors_are_one_line_exit_2(chest_ct_path, tmp_path, args, message):
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(rgb))
    subst = {"{CT}": str(chest_ct_path), "{RGB}": str(rgb)}
    argv = [a.replace("{PORT}", str(free_port())) for a in args]
    argv = [subst.get(a, a) for a in argv] + ["--out", str(tmp_path / "o")]
    r = _runner(*argv)
    assert r.returncode == 2, r.stderr
    last = [ln for ln in r.stderr.splitlines() if ln.startswith("minigptmed-slicer: error:")]
    assert len(last) == 1 and message in last[0], r.stderr


# -- sweeps ------------------------------------------------------------------------------------------

LESIONS = [  # centre (i, j, k) voxel indices, radii (i, j, k) voxels, HU
    ((40, 40, 30), (8, 8, 8), 40),
    ((90, 80, 34), (5, 5, 5), 30),
    ((130, 60, 28), (8, 6, 10), 20),
    ((60, 110, 40), (7, 10, 6), 45),
]


@pytest.fixture(scope="module")
def lesion_volume(tmp_path_factory):
    """A synthetic CT in HU (1 mm voxels): air, a body of soft tissue with a bone at the back, one large aerated lung
    field, and four solid nodules (spheres and ellipsoids) in it."""
    rng = np.random.default_rng(0)
    kk, jj, ii = np.mgrid[:64, :160, :170]
    vol = np.full(kk.shape, -1000.0, np.float32)
    vol[((jj - 80) / 75.0) ** 2 + ((ii - 85) / 80.0) ** 2 < 1] = 40
    vol[((jj - 80) / 67.0) ** 2 + ((ii - 85) / 72.0) ** 2 < 1] = -860
    vol[((jj - 150) / 4.0) ** 2 + ((ii - 85) / 6.0) ** 2 < 1] = 700  # bone, so that the range reads as CT
    for (ci, cj, ck), (ri, rj, rk), hu in LESIONS:
        vol[((ii - ci) / ri) ** 2 + ((jj - cj) / rj) ** 2 + ((kk - ck) / rk) ** 2 < 1] = hu
    vol += rng.normal(0, 15, vol.shape)
    img = sitk.GetImageFromArray(np.round(vol).astype(np.int16))
    img.SetOrigin((12.0, -30.0, 5.0))
    path = tmp_path_factory.mktemp("vol") / "lesions.nrrd"
    sitk.WriteImage(img, str(path))
    centres_ras = [(-(12.0 + ci), -(-30.0 + cj), 5.0 + ck) for (ci, cj, ck), _, _ in LESIONS]  # LPS -> RAS, 1 mm voxels
    return path, centres_ras


def _match(findings, centre):
    return min(findings, key=lambda f: np.linalg.norm(np.subtract(f["center_ras"], centre)))


def test_sweep_runner_gives_one_3d_finding_per_lesion(lesion_volume, tmp_path):
    from headless.runner import main

    path, centres = lesion_volume
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                str(path),
                "--view",
                "axial",
                "--task",
                "detect",
                "--window",
                "1500",
                "--level",
                "-500",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "findings.json").read_text())
    solid = [f for f in data["findings"] if not f["isolated"]]
    assert len(solid) == len(LESIONS), [(f["label"], f["center_ras"]) for f in solid]
    for centre, (_, radii, _hu) in zip(centres, LESIONS, strict=True):
        f = _match(solid, centre)
        assert f["label"].startswith("lung nodule candidate (solid, ")
        assert np.all(np.abs(np.subtract(f["center_ras"], centre)) <= 1.0), (f["center_ras"], centre)
        extent = [*sorted(f["size_mm"][:2]), f["size_mm"][2]]
        expected = [*sorted([2 * radii[0], 2 * radii[1]]), 2 * radii[2]]
        assert np.all(np.abs(np.subtract(extent, expected)) <= 2.0), (f["size_mm"], expected)
    assert data["slices_per_s"] > 0 and (out / "scene.mrb").exists() and (out / "view.png").exists()


@pytest.fixture(scope="module")
def sweep_scene(lesion_volume):
    ctx = S.create_scene()
    vol = S.load_volume(ctx, str(lesion_volume[0]))
    vol.GetDisplayNode().AutoWindowLevelOff()
    vol.GetDisplayNode().SetWindowLevel(1500, -500)
    yield ctx, vol
    S.close(ctx)


def test_oblique_sweep_finds_the_lesions(sweep_scene, lesion_volume, builtin_server):
    ctx, vol = sweep_scene
    sl = S.add_slice_view(ctx, vol, "ObliqueSweep", "Axial", (256, 256))
    sn = sl.GetSliceNode()
    sn.SetSliceToRASByNTP(0.0, 0.25, 0.97, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)  # tilted about 15 degrees
    sl.FitSliceToAll()
    result = run_sweep(sl, vol, BackendClient(builtin_server), batch_size=16)
    solid = [f for f in result.findings if not f.isolated]
    for centre in lesion_volume[1]:
        best = min(solid, key=lambda f: np.linalg.norm(np.subtract(f.center_ras, centre)))
        assert np.linalg.norm(np.subtract(best.center_ras, centre)) <= 2.5
        assert (
            abs(float(np.dot(np.asarray(best.axes)[:, 2], [0.0, 0.25, 0.97] / np.linalg.norm([0, 0.25, 0.97])))) > 0.999
        )


def test_batched_equals_one_at_a_time_and_cancel_is_clean(sweep_scene, builtin_server):
    ctx, vol = sweep_scene
    sl = S.add_slice_view(ctx, vol, "BatchSweep", "Axial", (200, 180))
    plan = plan_sweep(sl, vol, (10, 50), step=2)
    assert len(plan.indices) == 20 and plan.swept_spacing_mm == pytest.approx(2.0)
    offset_before = sl.GetSliceOffset()
    captured = capture_sweep(sl, plan)
    assert sl.GetSliceOffset() == offset_before
    client = BackendClient(builtin_server)
    batched = analyze_sweep(client, captured, batch_size=8)
    single = analyze_sweep(client, captured, batch_size=1)
    assert [[f.box for f in r.findings] for r in batched] == [[f.box for f in r.findings] for r in single]
    assert any(r.findings for r in batched)
    findings = merge_sweep(captured, batched, plan)
    assert findings

    nodes_before = ctx.scene.GetNumberOfNodes()
    cancel = threading.Event()
    seen = []

    def progress(p):
        seen.append(p.done)
        if p.done == 5:
            cancel.set()

    with pytest.raises(SweepCancelled):
        capture_sweep(sl, plan, cancel=cancel, progress=progress)
    assert seen[-1] == 5 and sl.GetSliceOffset() == offset_before
    cancel2 = threading.Event()

    def progress2(p):
        if p.done >= 8:
            cancel2.set()

    with pytest.raises(SweepCancelled):
        analyze_sweep(client, captured, batch_size=4, cancel=cancel2, progress=progress2)
    assert ctx.scene.GetNumberOfNodes() == nodes_before
    nodes = M.add_sweep_results(
        ctx.scene,
        findings,
        task="detect",
        engine="builtin",
        model="m",
        view_name="BatchSweep",
        summary="s",
        offsets_mm=plan.offsets_mm,
    )
    assert len(nodes.rois) == len(findings)
    roi = nodes.rois[0]
    assert roi.GetAttribute("MiniGPTMed.slices") == str(len(findings[0].slice_positions))
    assert np.allclose(M.roi_center(roi), findings[0].center_ras, atol=1e-4)
    M.remove_analysis(ctx.scene, nodes.folder_item)
    assert ctx.scene.GetNumberOfNodes() == nodes_before


def test_batch_endpoint_runs_engine_batches():
    """The server hands a whole batch to the engine in one call."""
    calls = []

    class CountingEngine(BuiltinEngine):
        def analyze_batch(self, inputs, stop):
            calls.append(len(inputs))
            return super().analyze_batch(inputs, stop)

    from conftest import b64, blob_image
    from MiniGPTMedSlicerLib.png import encode_png
    from MiniGPTMedSlicerLib.protocol import AnalyzeRequest

    with ServerThread(CountingEngine()) as url:
        reqs = [AnalyzeRequest(task="report", image=b64(encode_png(blob_image(seed=i)))) for i in range(6)]
        out = BackendClient(url).analyze_batch(reqs)
    assert calls == [6] and len(out) == 6


def test_capture_helpers_reject_empty_view(sweep_scene):
    ctx, vol = sweep_scene
    sl = S.add_slice_view(ctx, vol, "EmptyView", "Axial", (64, 64))
    sl.GetSliceCompositeNode().SetBackgroundVolumeID(None)
    with pytest.raises(ValueError, match="shows no volume"):
        C.capture_slice(sl)


def test_clicking_a_3d_finding_jumps_to_its_best_slice(sweep_scene, builtin_server):
    ctx, vol = sweep_scene
    sl = S.add_slice_view(ctx, vol, "BestSliceSweep", "Axial", (200, 200))
    result = run_sweep(sl, vol, BackendClient(builtin_server), batch_size=16)
    solid = [f for f in result.findings if not f.isolated]
    nodes = M.add_sweep_results(
        ctx.scene,
        solid,
        task="detect",
        engine="builtin",
        model="m",
        view_name="BestSliceSweep",
        summary="s",
        offsets_mm=result.plan.offsets_mm,
    )
    try:
        f, roi = solid[0], nodes.rois[0]
        sl.SetSliceOffset(result.plan.offsets_mm[0])
        M.jump_to_finding([sl.GetSliceNode()], roi)
        assert sl.GetSliceOffset() == pytest.approx(result.plan.offsets_mm[f.best_slice_pos], abs=1e-3)
        assert np.allclose(M.roi_center(roi)[:2], f.center_ras[:2], atol=1e-3)
    finally:
        M.remove_analysis(ctx.scene, nodes.folder_item)
