"""The picture shows what the view shows: in the offscreen render (headless/render.py, the runner's view.png) the
tissue inside a box is the tissue of the slice under the stored fill opacity, and the labels are inside the view,
beside their boxes, never over one another. Real MRML (slicer-core) and a real chest CT, on a non-square view."""

from __future__ import annotations

import numpy as np
import pytest
from MiniGPTMedSlicerLib import capture as C
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib import scene as S

from headless.render import place_labels, render_slice_view, wrap_label

VIEW = (360, 240)  # landscape: x and y scale differently if a transpose creeps in
# Three boxes on the coronal CT (spleen and wall, liver, heart): one near the right edge (its label would be cut
# there), two side by side (their labels would overlap), all with long names.
BOXES = [[250.0, 120.0, 300.0, 190.0], [95.0, 140.0, 165.0, 210.0], [168.0, 80.0, 235.0, 145.0]]
LABELS = ["hyperdense region near the right edge", "lesion on the left side", "lesion beside it, long name"]
GLYPH_R = 12  # px: the ROI's centre point glyph (Slicer draws it) is left out of the comparison


@pytest.fixture(scope="module")
def rendered(chest_ct_path, tmp_path_factory):
    from PIL import Image

    ctx = S.create_scene()
    vol = S.load_volume(ctx, str(chest_ct_path))
    vol.GetDisplayNode().SetAutoWindowLevel(0)
    vol.GetDisplayNode().SetWindowLevel(400.0, 40.0)
    sl = S.add_slice_view(ctx, vol, "PictureView", "Coronal", VIEW)
    cap = C.capture_slice(sl)
    response = protocol.AnalyzeResponse(
        task="detect",
        engine="test",
        model="m",
        text="Three findings.",
        findings=[protocol.Finding(lab, b, 0.5) for lab, b in zip(LABELS, BOXES, strict=True)],
        raw_output="<raw>",
    )
    nodes = M.add_analysis_results(ctx.scene, cap, response)
    path = render_slice_view(ctx.app_logic, sl, str(tmp_path_factory.mktemp("view") / "view.png"), VIEW)
    view = np.asarray(Image.open(path).convert("RGB")).astype(float)
    yield cap, nodes, view
    S.close(ctx)


def test_view_has_the_capture_size(rendered):
    cap, _, view = rendered
    assert (cap.width, cap.height) == VIEW and view.shape == (VIEW[1], VIEW[0], 3)


@pytest.mark.parametrize("i", range(len(BOXES)))
def test_tissue_inside_each_box_shows_through_the_fill(rendered, i):
    """Mean inside the box: view.png == (1 - a) * input.png + a * fill colour, a the fill opacity stored in the
    scene. The render is at the capture's size and field of view, so both sample the same slice on the same pixel
    grid; what differs is the view's interpolation and 8-bit rounding, a few grey levels on a mean over thousands
    of pixels (measured: under 1 level): 4 levels allows that and still fails any fill drawn over black (about 20 here) or opaque."""
    cap, nodes, view = rendered
    x0, y0, x1, y1 = (int(v) for v in BOXES[i])
    yy, xx = np.mgrid[y0 + 4 : y1 - 4, x0 + 4 : x1 - 4]
    keep = (xx + 0.5 - (x0 + x1) / 2) ** 2 + (yy + 0.5 - (y0 + y1) / 2) ** 2 > GLYPH_R**2
    ys, xs = yy[keep], xx[keep]
    d = nodes.rois[i].GetDisplayNode()
    a = d.GetFillOpacity()
    assert 0 < a < 0.5  # what markups.add_roi stores: a light fill
    grey = np.asarray(cap.pixels, dtype=float)[ys, xs].mean()
    assert 40 < grey < 215, grey  # tissue with contrast, not air or saturated
    expected = (1 - a) * grey + a * 255 * np.array(d.GetColor())
    found = view[ys, xs].mean(axis=0)
    assert np.all(np.abs(found - expected) < 4), (found, expected)


def test_render_leaves_the_label_settings_of_the_scene(rendered):
    _, nodes, _ = rendered
    assert all(r.GetDisplayNode().GetPropertiesLabelVisibility() for r in nodes.rois)


def _inside(r, size, m=0):
    return r[0] >= m and r[1] >= m and r[2] <= size[0] - m and r[3] <= size[1] - m


def _disjoint(a, b):
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_labels_inside_the_view_beside_their_box_and_apart():
    size = (512, 512)
    boxes = [(470.0, 100.0, 505.0, 130.0), (100.0, 300.0, 140.0, 330.0), (100.0, 260.0, 140.0, 295.0)]
    sizes = [(200.0, 14.0), (300.0, 14.0), (300.0, 14.0)]
    rects = place_labels(boxes, sizes, size)
    for r, (w, h) in zip(rects, sizes, strict=True):
        assert _inside(r, size, 3) and (r[2] - r[0], r[3] - r[1]) == (w, h)
    assert all(_disjoint(a, b) for k, a in enumerate(rects) for b in rects[k + 1 :])
    assert all(_disjoint(r, b) for r in rects for b in boxes)
    # no room on the right of the first box: its label goes on its left, at the box's top
    assert rects[0] == (470.0 - 3 - 200, 100.0, 470.0 - 3, 114.0)
    # the second box has room on its right
    assert rects[1] == (143.0, 300.0, 443.0, 314.0)


def test_crowded_labels_still_do_not_overlap():
    size = (200, 120)
    boxes = [(90.0, 50.0, 110.0, 70.0)] * 5
    rects = place_labels(boxes, [(60.0, 12.0)] * 5, size)
    assert all(_inside(r, size, 3) for r in rects)
    assert all(_disjoint(a, b) for k, a in enumerate(rects) for b in rects[k + 1 :])


def test_long_label_wraps_to_the_view_width():
    def width(s):
        return 7.0 * len(s)

    lines = wrap_label("lung nodule candidate (solid, 13 mm, -74 HU)", 140, width)
    assert lines == ["lung nodule", "candidate (solid, 13", "mm, -74 HU)"]  # 20 characters at most
    assert " ".join(lines) == "lung nodule candidate (solid, 13 mm, -74 HU)"
