"""The panel's conversation in the Qt-free logic (AnalysisLogic + chat.py) on a real slicer-core scene with the CT
phantom, the built-in engine behind a real server: a follow-up's boxes go under the conversation's analysis, placed
with the geometry of the image that was sent (a pan between the turns does not move them); a slice, view or volume
change ends the conversation; a failed follow-up changes nothing; the conversation saved on the text node comes back
from the same scene (and continues there) and from a reopened .mrb, naming the saved image_id (no upload; one after a
restarted server's 404; a new one when the view shows other pixels); an unreadable saved conversation is skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib import scene as S
from MiniGPTMedSlicerLib.chat import CONVERSATION_ATTR, CONVERSATION_KEY_ATTR, IMAGE_ID_ATTR, saved_conversation
from MiniGPTMedSlicerLib.client import run_calls
from MiniGPTMedSlicerLib.logic import SWEEP_LABEL, AnalysisError, AnalysisLogic, Job


@pytest.fixture(scope="module")
def mrml(ct_phantom_path):
    ctx = S.create_scene()
    vol = S.load_volume(ctx, str(ct_phantom_path))
    S.add_slice_view(ctx, vol, "Red", "Axial", (300, 200))  # non-square
    S.add_slice_view(ctx, vol, "Yellow", "Sagittal", (200, 200))
    yield ctx
    S.close(ctx)


@pytest.fixture
def logic(mrml, builtin_server):
    M.clear_results(mrml.scene)
    mrml.slice_logics["Red"].SetSliceOffset(10.0)
    lg = AnalysisLogic(mrml.scene, lambda: dict(mrml.slice_logics))
    lg.configure(builtin_server, None)
    ended: list[str] = []
    lg.on_conversation_ended = ended.append
    lg.ended = ended  # type: ignore[attr-defined]
    yield lg
    lg.new_conversation()
    M.clear_results(mrml.scene)


def done(logic: AnalysisLogic, job: Job):
    assert job.done.wait(60)
    return logic.finish(job)


def rois_of(scene, folder: int) -> list:
    return [n for n in M.analysis_nodes(scene, folder) if n.IsA("vtkMRMLMarkupsROINode")]


def test_follow_up_boxes_go_under_the_analysis_with_the_sent_images_geometry(mrml, logic):
    first = done(logic, logic.start("Red", "Detect"))
    assert first.ok and first.n_findings >= 1, first.message
    (folder,) = M.list_results(mrml.scene)
    before = [M.roi_center(r) for r in rois_of(mrml.scene, folder)]
    # pan the view: the slice plane is the same, so the conversation goes on about the image that was sent
    red = mrml.slice_logics["Red"].GetSliceNode()
    origin = list(red.GetXYZOrigin())
    red.SetXYZOrigin(origin[0] + 25.0, origin[1] - 15.0, origin[2])
    assert logic.chat is not None and logic.ended == []
    second = done(logic, logic.start_follow_up("Red", "", task_name="Detect"))
    assert second.ok and "(turn 2)" in second.message, second.message
    assert M.list_results(mrml.scene) == [folder]  # no new analysis
    rois = rois_of(mrml.scene, folder)
    new = [r for r in rois if r.GetAttribute(M.ATTR + "turn") == "2"]
    assert len(new) == first.n_findings and len(rois) == 2 * first.n_findings
    # the same image gives the same boxes: they land where the first turn's did, not shifted by the pan
    for c0, r in zip(before, new, strict=True):
        assert np.allclose(M.roi_center(r), c0, atol=1e-6)
    assert [r.GetAttribute(M.ATTR + "index") for r in rois] == [str(i + 1) for i in range(len(rois))]
    sh = M.subject_hierarchy(mrml.scene)
    assert sh.GetItemAttribute(folder, M.ATTR + "findings") == str(len(rois))
    conv = logic.chat.conversation
    assert [t.task for t in conv.turns] == ["detect", "detect"] and conv.uploads == 1 and conv.image_id
    node = M.text_node_of(mrml.scene, folder)
    assert node.GetText() == logic.transcript() == conv.transcript()
    assert json.loads(node.GetAttribute(M.ATTR + CONVERSATION_ATTR)) == json.loads(conv.to_json())
    red.SetXYZOrigin(*origin)


def test_a_slice_view_or_volume_change_ends_the_conversation(mrml, logic, ct_phantom_path):
    assert done(logic, logic.start("Red", "Report")).ok
    assert logic.chat is not None
    mrml.slice_logics["Red"].SetSliceOffset(20.0)
    assert logic.chat is None and logic.ended == ["New conversation: the slice or the volume of the Red view changed."]
    assert logic.transcript() == ""
    # the next question is the first turn of a new analysis (about the new slice)
    assert done(logic, logic.start_follow_up("Red", "", task_name="Report")).ok
    assert len(M.list_results(mrml.scene)) == 2 and len(logic.chat.conversation.turns) == 1
    logic.select_view("Red")
    assert logic.chat is not None
    logic.select_view("Yellow")
    assert logic.chat is None and logic.ended[-1] == "New conversation: the view changed to Yellow."
    # another volume in the view
    assert done(logic, logic.start("Red", "Report")).ok
    comp = mrml.slice_logics["Red"].GetSliceCompositeNode()
    shown = comp.GetBackgroundVolumeID()
    other = S.load_volume(mrml, str(ct_phantom_path))
    try:
        comp.SetBackgroundVolumeID(other.GetID())
        assert logic.chat is None
    finally:
        comp.SetBackgroundVolumeID(shown)
        M.remove_node(mrml.scene, other)


class OnTheCallingThread:
    """Runs a job's calls (real HTTP, requests) in the calling thread, as the panel's Qt runner runs them on the main
    thread: a sweep then captures each slice when its turn comes."""

    on_main_thread = True

    def run(self, job: Job, client, calls) -> None:
        try:
            job.result = run_calls(calls, client, job.cancel)
        except BaseException as e:
            job.error = e
        job.done.set()


@pytest.mark.parametrize("runner", [None, OnTheCallingThread()], ids=["worker", "main_thread"])
def test_a_sweep_of_the_view_keeps_its_conversation(mrml, logic, runner):
    """A sweep captures its slices by moving the view and puts it back: the view shows the conversation's image
    again, so the conversation goes on (it ended at the sweep's first slice)."""
    assert done(logic, logic.start("Red", "Report")).ok
    (folder,) = M.list_results(mrml.scene)
    offset = mrml.slice_logics["Red"].GetSliceOffset()
    sweep = done(logic, logic.start("Red", SWEEP_LABEL, sweep_range="20:24", runner=runner))
    assert sweep.ok, sweep.message
    assert mrml.slice_logics["Red"].GetSliceOffset() == offset  # the view is back on the conversation's slice
    assert logic.ended == [] and logic.chat is not None and logic.chat.folder_item == folder
    second = done(logic, logic.start_follow_up("Red", "", task_name="Report"))
    assert second.ok and "(turn 2)" in second.message, second.message


def test_a_failed_follow_up_changes_nothing(mrml, logic):
    assert done(logic, logic.start("Red", "Report")).ok
    saved = logic.chat.conversation.to_json()
    nodes = mrml.scene.GetNumberOfNodes()
    # the built-in engine does not answer free questions: the server's 501, one line
    out = done(logic, logic.start_follow_up("Red", "is there a mass?"))
    assert not out.ok and "501" in out.message, out.message
    assert logic.chat.conversation.to_json() == saved and mrml.scene.GetNumberOfNodes() == nodes
    with pytest.raises(AnalysisError, match="Type a question for Ask"):
        logic.start_follow_up("Red", "  ")
    job = logic.start_follow_up("Red", "", task_name="Detect")
    logic.cancel(job)
    assert not done(logic, job).ok
    assert logic.chat.conversation.to_json() == saved and mrml.scene.GetNumberOfNodes() == nodes
    # New conversation while a follow-up is on its way: its answer is added, the conversation stays ended
    job = logic.start_follow_up("Red", "", task_name="Detect")
    logic.new_conversation()
    assert done(logic, job).ok and logic.chat is None


def test_restored_from_the_scene_and_from_a_reopened_mrb(mrml, logic, builtin_server, tmp_path):
    assert done(logic, logic.start("Red", "Detect")).ok
    assert done(logic, logic.start_follow_up("Red", "", task_name="Report")).ok
    (folder,) = M.list_results(mrml.scene)
    saved = logic.chat.conversation.to_json()
    key = logic.chat.key
    logic_image_id = logic.chat.conversation.image_id
    assert logic_image_id and logic.chat.conversation.uploads == 1
    node = M.text_node_of(mrml.scene, folder)
    assert node.GetAttribute(M.ATTR + IMAGE_ID_ATTR) == logic_image_id
    # a new logic on the same scene (the module reloaded): the conversation comes back and goes on there
    again = AnalysisLogic(mrml.scene, lambda: dict(mrml.slice_logics))
    again.configure(builtin_server, None)
    state = again.restore_conversation()
    assert state is not None and state.conversation.to_json() == saved and state.key == key
    assert state.folder_item == folder and again.transcript() == logic.transcript()
    logic.new_conversation()
    third = done(again, again.start_follow_up("Red", "", task_name="Detect"))
    assert third.ok and "(turn 3)" in third.message, third.message
    assert M.list_results(mrml.scene) == [folder] and len(again.chat.conversation.turns) == 3
    conv = again.chat.conversation  # the image captured again is the one stored: its saved id, no new upload
    assert conv.uploads == 0 and conv.image_id == logic_image_id
    three = again.chat.conversation.to_json()
    again.new_conversation()
    # saved as .mrb and opened again
    mrb = S.save_mrb(mrml, str(tmp_path / "c.mrb"))
    back = S.open_mrb(mrb, str(tmp_path / "u"))
    try:
        state = saved_conversation(back.scene)
        assert state is not None and state.conversation.to_json() == three and state.key == key
        assert state.view == "Red" and state.captured is None
        # an unreadable conversation is skipped, the scene is left as it is
        (item,) = M.list_results(back.scene)
        node = M.text_node_of(back.scene, item)
        node.SetAttribute(M.ATTR + CONVERSATION_ATTR, "{not json")
        n = back.scene.GetNumberOfNodes()
        assert saved_conversation(back.scene) is None and back.scene.GetNumberOfNodes() == n
        assert node.GetAttribute(M.ATTR + CONVERSATION_KEY_ATTR) == key
    finally:
        S.close(back)


def _attach_red_view(ctx) -> None:
    """A slice logic on the reopened scene's own Red slice node (as Slicer's views attach to a loaded scene)."""
    import slicer

    sl = slicer.vtkMRMLSliceLogic()
    sl.SetMRMLApplicationLogic(ctx.app_logic)
    sl.SetMRMLScene(ctx.scene)
    ctx.app_logic.GetSliceLogics().AddItem(sl)
    node = ctx.scene.GetSingletonNode("Red", "vtkMRMLSliceNode")
    sl.SetSliceNode(node)
    sl.ResizeSliceNode(300, 200)  # the view widget sizes its slice node (the size in pixels is not in a scene)
    ctx.slice_logics["Red"] = sl


def _continued(scene_ctx, url: str):
    """A new logic on ``scene_ctx`` (a reopened scene) against ``url``: its restored conversation, continued once."""
    lg = AnalysisLogic(scene_ctx.scene, lambda: dict(scene_ctx.slice_logics))
    lg.configure(url, None)
    state = lg.restore_conversation()
    assert state is not None and state.conversation.image_id
    out = done(lg, lg.start_follow_up("Red", "", task_name="Detect"))
    assert out.ok, out.message
    conv = lg.chat.conversation
    lg.new_conversation()
    return state.conversation.image_id, conv


def test_a_reopened_mrb_reuses_the_stored_image_id(mrml, logic, tmp_path):
    from backend.engines.builtin import BuiltinEngine
    from backend.server_thread import ServerThread

    assert done(logic, logic.start_follow_up("Red", "", task_name="Detect")).ok
    assert done(logic, logic.start_follow_up("Red", "", task_name="Report")).ok
    image_id = logic.chat.conversation.image_id
    assert image_id and logic.chat.conversation.uploads == 1
    logic.new_conversation()
    back = S.open_mrb(S.save_mrb(mrml, str(tmp_path / "c.mrb")), str(tmp_path / "u"))
    try:
        _attach_red_view(back)
        # the same server: the follow-up sends the saved id, nothing is uploaded
        saved, conv = _continued(back, logic.base_url)
        assert saved == image_id and conv.uploads == 0 and conv.image_id == image_id and len(conv.turns) == 3
        # a restarted server does not know the id: one upload (after its 404), and the answer
        with ServerThread(BuiltinEngine()) as fresh:
            saved, conv = _continued(back, fresh)
        assert saved == image_id and conv.uploads == 1 and len(conv.turns) == 4
        # the view shows other pixels now (another window): the saved id is not used, the new image is uploaded
        vol = back.slice_logics["Red"].GetSliceCompositeNode().GetBackgroundVolumeID()
        display = back.scene.GetNodeByID(vol).GetDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(1500.0, -600.0)  # a lung window (it was 400/40)
        saved, conv = _continued(back, logic.base_url)
        assert saved == image_id and conv.uploads == 1 and conv.image_id != image_id
    finally:
        S.close(back)


def test_the_question_box_hint_follows_the_engines_tasks(logic, builtin_server):
    """Ask needs an engine that lists vqa: the built-in engine's health answer does not, so the logic gives the hint
    (the panel disables its question box with it); another URL or a failed connection: not known, no hint."""
    from MiniGPTMedSlicerLib.chat import NO_FREE_QUESTIONS

    assert logic.ask_hint() is None  # not asked yet
    assert done(logic, logic.start_health()).ok
    assert "vqa" not in logic.engine_tasks and logic.ask_hint() == NO_FREE_QUESTIONS
    logic.configure(builtin_server + "/", None)  # another URL (as typed): what was learnt is forgotten
    assert logic.ask_hint() is None
    assert done(logic, logic.start_health()).ok and logic.ask_hint() == NO_FREE_QUESTIONS
    logic.configure("http://127.0.0.1:9", None)  # nothing listens there
    assert not done(logic, logic.start_health()).ok and logic.engine_tasks is None and logic.ask_hint() is None


def _import_mrb(ctx, mrb: str, work_dir) -> None:
    """``mrb`` added to ``ctx``'s scene as Slicer's Add Data does (an import: nodes whose IDs are taken get new ones)."""
    import zipfile

    with zipfile.ZipFile(mrb) as z:
        z.extractall(work_dir)
    (mrml_file,) = [p for p in work_dir.rglob("*.mrml")]
    ctx.scene.SetURL(str(mrml_file))
    assert ctx.scene.Import()


def test_an_mrb_added_to_a_scene_with_a_volume_keeps_its_conversation_on_its_own_volume(
    mrml, logic, tmp_path, ct_phantom_path
):
    assert done(logic, logic.start("Red", "Detect")).ok
    key = logic.chat.key
    logic.new_conversation()
    mrb = S.save_mrb(mrml, str(tmp_path / "c.mrb"))
    other = S.create_scene()
    try:
        first = S.load_volume(other, str(ct_phantom_path))  # takes the ID the saved volume had
        _import_mrb(other, mrb, tmp_path / "u")
        volumes = [other.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode") for i in range(2)]
        (imported,) = [v for v in volumes if v.GetID() != first.GetID()]
        saved_vol = key.split("|")[1]
        assert first.GetID() == saved_vol and imported.GetID() != saved_vol  # renumbered on import
        state = saved_conversation(other.scene)
        assert state is not None
        # the conversation is about the imported volume (its slice plane unchanged), not the one that now has its ID
        assert state.key.split("|")[1] == imported.GetID()
        assert state.key.split("|")[0::2] == key.split("|")[0::2] and state.key.split("|")[3] == key.split("|")[3]
    finally:
        S.close(other)
