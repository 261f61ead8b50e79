"""Face pictures: the InstantID keypoint image against an independent numpy rasterisation of the
published recipe, the placement onto a canvas, and the analysis preview / text."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hyperlora.errors import ImageInputError, SettingError
from hyperlora.faces.analysis import DetectedFace
from hyperlora.faces.drawing import (_font, describe_faces, draw_analysis, draw_keypoints, face_label, fit_label,
                                      place_keypoints)
from PIL import Image, ImageDraw

# the published recipe, restated as data for the reference below
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
LIMBS = [(0, 2), (1, 2), (3, 2), (4, 2)]


def reference_keypoints(kps: np.ndarray, width: int, height: int) -> np.ndarray:
    """Analytic rasterisation (no cv2, no PIL): a pixel centre inside the rotated ellipse of a limb
    (semi-axes half the limb's length and 4 px) gets 60 % of the outer point's colour, a pixel centre
    within 10 px of a keypoint its full colour; later shapes cover earlier ones."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    for a, b in LIMBS:
        (xa, ya), (xb, yb) = kps[a], kps[b]
        mx, my = (xa + xb) / 2, (ya + yb) / 2
        theta = math.atan2(ya - yb, xa - xb)
        along = (xx - mx) * math.cos(theta) + (yy - my) * math.sin(theta)
        across = -(xx - mx) * math.sin(theta) + (yy - my) * math.cos(theta)
        semi = math.hypot(xa - xb, ya - yb) / 2
        inside = (along / semi) ** 2 + (across / 4.0) ** 2 <= 1.0
        out[inside] = np.floor(np.array(COLOURS[a]) * 0.6).astype(np.uint8)
    for (x, y), colour in zip(kps, COLOURS):
        out[(xx - x) ** 2 + (yy - y) ** 2 <= 100.0] = colour
    return out


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    grown = mask.copy()
    padded = np.pad(mask, r)
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            grown |= padded[r + dy:r + dy + h, r + dx:r + dx + w]
    return grown


def assert_same_drawing(got: np.ndarray, want: np.ndarray, *, within: int) -> None:
    """Every colour region (5 points, 4 dimmed limbs) is present in both and their pixels are at most
    ``within`` px (Chebyshev) from a pixel of the same colour in the other image; the rest is black."""
    assert got.shape == want.shape and got.dtype == np.uint8
    colours = {tuple(c) for c in COLOURS} | {tuple(int(v * 0.6) for v in COLOURS[a]) for a, _ in LIMBS}
    found = {tuple(c) for c in np.unique(got.reshape(-1, 3), axis=0)}
    assert found <= colours | {(0, 0, 0)}, found - colours
    for colour in colours:
        g = np.all(got == colour, axis=-1)
        w = np.all(want == colour, axis=-1)
        assert g.any() and w.any(), colour
        assert not (g & ~_dilate(w, within)).any(), (colour, int((g & ~_dilate(w, within)).sum()))
        assert not (w & ~_dilate(g, within)).any(), (colour, int((w & ~_dilate(g, within)).sum()))


KPS = np.array([[130.0, 140.0], [200.0, 138.0], [166.0, 185.0], [138.0, 230.0], [195.0, 226.0]])


def test_keypoint_image_matches_the_independent_drawing():
    got = draw_keypoints(KPS, 320, 300)
    assert got.shape == (300, 320, 3)
    assert_same_drawing(got, reference_keypoints(KPS, 320, 300), within=2)
    # the points are full colour discs of radius 10 at the keypoints (truncated centres)
    for (x, y), colour in zip(KPS, COLOURS):
        assert tuple(got[int(y), int(x)]) == colour
        assert tuple(got[int(y), int(x) + 9]) == colour and tuple(got[int(y), int(x) + 12]) != colour
    # outside the face: black
    assert not got[:100].any() and not got[260:].any()


def test_rotated_face_and_points_near_the_border():
    angle = math.radians(35)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    kps = (KPS - KPS.mean(0)) @ rot.T + np.array([40.0, 50.0])     # partly outside the 200x150 canvas
    got = draw_keypoints(kps, 200, 150)
    want = reference_keypoints(kps, 200, 150)
    visible = [c for c in COLOURS if np.all(want == c, axis=-1).any()]
    assert len(visible) >= 3
    assert np.abs(got.astype(int) - want.astype(int)).any(axis=-1).mean() < 0.02


def test_bad_keypoints_and_canvas():
    with pytest.raises(ValueError):
        draw_keypoints(np.zeros((4, 2)), 64, 64)
    with pytest.raises(ValueError):
        draw_keypoints(np.full((5, 2), np.nan), 64, 64)
    with pytest.raises(SettingError):
        draw_keypoints(KPS, 0, 64)


def test_place_keypoints_moves_and_scales_the_face_box():
    bbox = np.array([120.0, 110.0, 210.0, 250.0])           # 90 px wide, centre (165, 180)
    placed = place_keypoints(KPS, bbox, center=(512.0, 400.0), face_width=270.0)
    expected = (KPS - np.array([165.0, 180.0])) * 3.0 + np.array([512.0, 400.0])
    assert np.allclose(placed, expected)
    # shape kept: distances scale by the same factor
    assert math.dist(placed[0], placed[1]) == pytest.approx(3.0 * math.dist(KPS[0], KPS[1]))
    with pytest.raises(ImageInputError):
        place_keypoints(KPS, np.array([10.0, 10.0, 10.0, 50.0]), center=(0, 0), face_width=10)
    with pytest.raises(SettingError):
        place_keypoints(KPS, bbox, center=(0, 0), face_width=0.0)


def _face(x1: float, y1: float, x2: float, y2: float, score: float) -> DetectedFace:
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    t = np.linspace(0, 2 * math.pi, 106, endpoint=False)
    lmk = np.stack([cx + 0.8 * half * np.cos(t), cy + 0.9 * half * np.sin(t)], axis=1).astype(np.float32)
    kps = np.array([[cx - 0.4 * half, cy - 0.2 * half], [cx + 0.4 * half, cy - 0.2 * half], [cx, cy],
                    [cx - 0.3 * half, cy + 0.4 * half], [cx + 0.3 * half, cy + 0.4 * half]], dtype=np.float32)
    return DetectedFace(bbox=np.array([x1, y1, x2, y2], np.float32), kps=kps, score=score, landmarks_106=lmk)


def test_preview_marks_the_chosen_face_and_adds_the_crops():
    image = np.full((300, 400, 3), 90, np.uint8)
    faces = [_face(40, 80, 140, 200, 0.91), _face(240, 60, 370, 220, 0.97)]
    crop = np.full((512, 512, 3), 200, np.uint8)
    out = draw_analysis(image, faces, 1, crops=[("CLIP", crop), ("ArcFace", crop)], title="2 faces")
    assert out.shape == (300, 400 + 150, 3)
    green, amber = np.array([40, 230, 90]), np.array([255, 190, 40])
    is_green = np.all(out[:, :400] == green, axis=-1)
    is_amber = np.all(out[:, :400] == amber, axis=-1)
    ys, xs = np.nonzero(is_green)
    assert xs.min() >= 238 and xs.max() <= 372          # green only on the chosen (right) face
    assert is_amber[:, :150].any() and not is_amber[:, 230:].any()
    # the chosen face's landmarks are drawn (red dots inside its box), not the other's
    red = np.all(out[:, :400] == np.array([255, 60, 60]), axis=-1)
    rys, rxs = np.nonzero(red)
    assert len(rxs) > 50 and rxs.min() >= 240 and rxs.max() <= 370
    assert (out[:150, 400:] > 150).mean() > 0.5       # the crop panel


def test_preview_without_faces_and_text():
    image = np.full((64, 80, 3), 30, np.uint8)
    out = draw_analysis(image, [], None, title="no face found")
    assert out.shape == (64, 80, 3) and (out != 30).any()
    text = describe_faces([], None, order="largest", image_size=(80, 64))
    assert "no face found in the 80x64 image" in text
    faces = [_face(40, 80, 140, 200, 0.91), _face(240, 60, 370, 220, 0.97)]
    text = describe_faces(faces, 0, order="left_to_right", image_size=(400, 300), heading="image 1 of 1:")
    lines = text.splitlines()
    assert lines[0] == "image 1 of 1:" and "2 face(s) in the 400x300 image" in lines[1] and "chosen: #0" in lines[1]
    assert lines[2] == "  #0: box (40, 80)-(140, 200), 100x120 px, score 0.910  <- chosen"
    assert lines[3] == "  #1: box (240, 60)-(370, 220), 130x160 px, score 0.970"


def test_labels_on_the_right_stay_inside_the_image_and_the_panel():
    """A face at the right edge and the crop labels of a narrow panel (a portrait photo) used to run past
    the right edge, cut off; every label's dark box now lies inside its region, all its text drawn."""
    h, w = 1024, 768                                         # portrait: the panel is w // 2 = 384 px wide
    image = np.full((h, w, 3), 90, np.uint8)
    faces = [_face(600, 300, 767, 500, 0.97)]                # the chosen face touches the right edge
    crop = np.full((512, 512, 3), 200, np.uint8)
    crops = [("CLIP input (ID condition)", crop), ("ArcFace input (4x face box)", crop)]
    out = draw_analysis(image, faces, 0, crops=crops, title="1 face(s); took #0")
    panel = out.shape[1] - w
    assert panel == 384
    font = _font(7 * 3 + 5)                                  # the preview's font for a 1024 px image
    draw = ImageDraw.Draw(Image.new("RGB", (w + panel, h)))
    for xy, text, bounds in [((600 + 6, 306), face_label(0, faces[0], True), (0, 0, w, h)),
                             ((w + 6, panel + 6), crops[1][0], (w, panel, w + panel, 2 * panel)),
                             ((w + 6, 6), "x" * 400, (w, 0, w + 40, 30))]:       # too long even when small
        (x, y), shown, used, box = fit_label(draw, xy, text, font, bounds)
        assert bounds[0] <= box[0] < box[2] <= bounds[2] and bounds[1] <= box[1] < box[3] <= bounds[3], text
        left, top, right, bottom = draw.textbbox((x, y), shown, font=used)
        assert box[0] <= left and right <= box[2] and box[1] <= top and bottom <= box[3]
        if text == crops[1][0]:                  # every pixel of the label's text is on the preview
            alone = Image.new("RGB", (w + panel, h))
            ImageDraw.Draw(alone).text((x, y), shown, fill=(255, 255, 255), font=used)
            expected = np.all(np.asarray(alone) == 255, axis=-1)
            assert shown == text and expected.sum() > 300
            assert np.array_equal(np.all(out == 255, axis=-1)[panel:2 * panel], expected[panel:2 * panel])
    assert shown.endswith("...") and len(shown) < 40
    green = np.all(out[:, :w] == np.array([40, 230, 90]), axis=-1)
    label_rows = green[306:340, 600:w - 8]                   # the face label's text, inside the image
    assert label_rows.sum() > 100
