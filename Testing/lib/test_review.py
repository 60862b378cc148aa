"""Review on a real slicer-core scene with the real chest CT and the built-in engine behind a real server: accept,
reject (hidden, not deleted), edit by moving an ROI in code (original box kept), rows, reload from .mrb."""

from __future__ import annotations

import numpy as np
from MiniGPTMedSlicerLib import capture as C
from MiniGPTMedSlicerLib import export as E
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib import review as R
from MiniGPTMedSlicerLib import scene as S
from MiniGPTMedSlicerLib.client import BackendClient
from MiniGPTMedSlicerLib.logic import AnalysisLogic

SHIFT = np.array([5.0, -3.0, 0.0])  # the edit moves the ROI by this (RAS mm)


def test_accept_reject_edit_and_reload(chest_ct_path, builtin_server, tmp_path):
    ctx = S.create_scene()
    try:
        vol = S.load_volume(ctx, str(chest_ct_path))
        sl = S.add_slice_view(ctx, vol, "Red", "Axial", (512, 384))
        captured = C.capture_slice(sl)
        client = BackendClient(builtin_server)
        # bone components: several boxes on any chest CT slice, labelled with what was measured
        response = client.analyze(C.to_request(captured, "ground", question="bone"))
        client.close()
        assert len(response.findings) >= 3
        M.add_analysis_results(ctx.scene, captured, response)
        logic = AnalysisLogic(ctx.scene, lambda: {"Red": sl})
        rows = logic.rows()
        assert {r.status for r in rows} == {"pending"}
        ids = [r.node_id for r in rows]
        logic.set_review([ids[0]], R.ACCEPTED)
        logic.set_review([ids[1]], R.REJECTED)
        rejected = ctx.scene.GetNodeByID(ids[1])
        assert not rejected.GetDisplayNode().GetVisibility() and ctx.scene.GetNodeByID(ids[1]) is not None
        edited = ctx.scene.GetNodeByID(ids[2])
        c0, s0 = M.roi_center(edited), np.array(edited.GetSize())
        logic.begin_edit(ids[2])
        assert not edited.GetLocked()
        R.move_roi(edited, c0 + SHIFT, s0 * [1.5, 0.5, 1.0])
        assert logic.finish_edit(ids[2]) == R.EDITED and edited.GetLocked()
        row = next(r for r in logic.rows() if r.node_id == ids[2])
        assert row.status == "edited" and row.size_mm[0] == round(float(s0[0] * 1.5), 1)
        assert [r.status for r in logic.rows()][:3] == ["accepted", "rejected", "edited"]
        exported = E.collect(ctx.scene)
        assert [x.id for x in exported] == ["F1", "F3"]
        assert np.allclose(exported[1].center_ras, c0 + SHIFT, atol=1e-3)
        S.save_mrb(ctx, str(tmp_path / "s.mrb"))
    finally:
        S.close(ctx)
    back = S.open_mrb(str(tmp_path / "s.mrb"), str(tmp_path / "u"))
    try:
        rois = R.finding_rois(back.scene)
        assert [R.status(r) for r in rois[:3]] == ["accepted", "rejected", "edited"]
        assert all(r.GetAttribute(R.TIME_ATTR) for r in rois[:3])
        assert all(R.status(r) == "pending" and not r.GetAttribute(R.TIME_ATTR) for r in rois[3:])
        assert not rois[1].GetDisplayNode().GetVisibility()
        orig = R.original_geometry(rois[2])
        assert orig is not None and np.allclose(orig[0], c0, atol=1e-3) and np.allclose(orig[1], s0, atol=1e-3)
        assert np.allclose(M.roi_center(rois[2]), c0 + SHIFT, atol=1e-3)
        AnalysisLogic(back.scene, dict).review_all(R.REJECTED)
        assert {R.status(r) for r in rois} == {"rejected"} and E.collect(back.scene) == []
    finally:
        S.close(back)
