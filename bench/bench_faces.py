"""Face analysis cost: our FaceAnalyzer vs the released recipe, on one 1024x1024 photo.

Run:  python bench/bench_faces.py [--antelope DIR] [--repeat N] [--smoke]

Without ``--antelope`` it uses the hand-weighted test pack (tests/fixtures/antelope.py): run
counts are exact, times only show the overhead shape (the fake models are far cheaper than the
real SCRFD-10G / glintr100).  With a real antelopev2 folder, times are real too.

Released recipe (format §6), emulated with insightface's own FaceAnalysis and all five models of
the pack loaded (what ``FaceAnalysis(name="antelopev2")`` does): detect at 640, 512, 384, 256
until a face is found (every model runs on every face found), then detect again at 640 on the
4l crop (again every model).  Each retry size is made effective (``prepare(det_size=...)`` for
2.x, the detector's ``input_size`` for 0.7.3) so the counts are those of the recipe as intended; its worst case is a face found only at 256.

Ours: ``find_faces`` (detector + 106 landmarks for the faces of the successful pass) and
``embedding`` (detector at 640 on the crop + recognition of the largest face).

Prints run counts, time per stage and the ratios ours / released.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hyperlora.faces.analysis import FaceAnalyzer, choose_face
from hyperlora.faces.options import DETECTION_SIZES  # noqa: E402
from tests.core.ref_hyperlora import arcface_crop  # noqa: E402


class Released:
    """insightface FaceAnalysis with the whole pack, instrumented to count runs."""

    def __init__(self, folder: Path):
        from insightface.app import FaceAnalysis

        self.app = FaceAnalysis(name=str(folder), providers=["CPUExecutionProvider"])
        self.app.prepare(ctx_id=0, det_size=(640, 640))
        self.det_passes = 0
        self.model_runs = 0
        det = self.app.det_model
        orig_detect = det.detect

        def detect(*a, **k):
            self.det_passes += 1
            self.model_runs += 1
            return orig_detect(*a, **k)

        det.detect = detect
        for task, model in self.app.models.items():
            if task == "detection":
                continue
            orig_get = model.get

            def get(*a, _orig=orig_get, **k):
                self.model_runs += 1
                return _orig(*a, **k)

            model.get = get

    def _set_size(self, size: int) -> None:
        # 2.x: only prepare() changes the size; 0.7.3: prepare() keeps the first size, the attribute works
        self.app.prepare(ctx_id=0, det_size=(size, size))
        self.app.det_model.input_size = (size, size)

    def run(self, img_rgb: np.ndarray) -> tuple[np.ndarray | None, dict[str, float]]:
        times = {}
        t = time.perf_counter()
        bgr = np.ascontiguousarray(img_rgb[..., ::-1])  # insightface takes BGR (ours converts inside too)
        faces = []
        for size in DETECTION_SIZES:
            self._set_size(size)
            faces = self.app.get(bgr)
            if faces:
                break
        times["find"] = time.perf_counter() - t
        if not faces:
            return None, times
        face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        crop = arcface_crop(img_rgb, face.landmark_2d_106)
        t = time.perf_counter()
        self._set_size(640)
        again = self.app.get(np.ascontiguousarray(crop[..., ::-1]))
        times["embed"] = time.perf_counter() - t
        if not again:
            return None, times
        best = max(again, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        return best.normed_embedding, times


def ours(fa: FaceAnalyzer, img: np.ndarray) -> tuple[np.ndarray | None, dict[str, float]]:
    times = {}
    t = time.perf_counter()
    faces = fa.find_faces(img)
    times["find"] = time.perf_counter() - t
    if not faces:
        return None, times
    face = choose_face(faces, "largest")
    crop = arcface_crop(img, face.landmarks_106)
    t = time.perf_counter()
    emb = fa.embedding(crop)
    times["embed"] = time.perf_counter() - t
    return emb, times


def photos() -> dict[str, np.ndarray]:
    import cv2
    from skimage import data

    from tests.fixtures.antelope import face_image

    astro = cv2.resize(data.astronaut(), (1024, 1024), interpolation=cv2.INTER_CUBIC)
    return {
        "portrait (astronaut, 1024 px)": astro,
        "close-up (face 900 px of 1024)": face_image((1024, 1024), [(512, 512, 900)], seeds=[3]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--antelope", type=Path, default=None, help="a real antelopev2 folder (default: the test pack)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions (best is reported)")
    ap.add_argument("--smoke", action="store_true", help="one repetition: a quick run that the script works (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.repeat = 1
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.antelope is None:
        from tests.conftest import test_cache_root
        from tests.fixtures.antelope import cached_antelopev2

        folder = cached_antelopev2(test_cache_root())
        print(f"pack: hand-weighted test models in {folder} (counts exact, times not representative)")
    else:
        folder = args.antelope
        print(f"pack: {folder}")

    import insightface  # noqa: F401  (import cost is not part of either load)

    t = time.perf_counter()
    fa = FaceAnalyzer(folder, provider="CPU")
    load_ours = time.perf_counter() - t
    t = time.perf_counter()
    rel = Released(fa.model_dir)
    load_rel = time.perf_counter() - t
    print(f"load: ours {load_ours * 1000:.0f} ms (3 models), released {load_rel * 1000:.0f} ms (5 models), "
          f"ratio {load_ours / load_rel:.2f}")

    typical: tuple[int, int] | None = None
    worst: tuple[int, int] | None = None
    for name, img in photos().items():
        # counts (one run each)
        fa.stats.reset()
        e_ours, _ = ours(fa, img)
        st = fa.stats.as_dict()
        rel.det_passes = rel.model_runs = 0
        e_rel, _ = rel.run(img)
        counts = (rel.det_passes, rel.model_runs)
        if typical is None:
            typical = (st["detector_runs"], st["model_runs"])
        worst = counts if worst is None or counts[1] > worst[1] else worst
        same = None if e_ours is None or e_rel is None else float(np.dot(e_ours, e_rel))
        # times (best of N, after the warm-up above)
        best_o: dict[str, float] = {}
        best_r: dict[str, float] = {}
        for _ in range(max(1, args.repeat)):
            for fn, best in ((lambda: ours(fa, img), best_o), (lambda: rel.run(img), best_r)):
                _, times = fn()
                for k, v in times.items():
                    best[k] = min(best.get(k, float("inf")), v)
        print(f"\n{name}")
        print(f"  detector passes: ours {st['detector_runs']} (sizes {st['det_sizes']}), released {counts[0]}, "
              f"ratio {st['detector_runs'] / counts[0]:.2f}")
        print(f"  model runs:      ours {st['model_runs']} (det {st['detector_runs']}, landmarks {st['landmark_runs']}, "
              f"recognition {st['recognition_runs']}), released {counts[1]}, ratio {st['model_runs'] / counts[1]:.2f}")
        for stage in ("find", "embed"):
            if stage in best_o and stage in best_r:
                print(f"  {stage:>5}: ours {best_o[stage] * 1000:7.1f} ms, released {best_r[stage] * 1000:7.1f} ms, "
                      f"ratio {best_o[stage] / best_r[stage]:.2f}")
        tot_o, tot_r = sum(best_o.values()), sum(best_r.values())
        print(f"  total: ours {tot_o * 1000:.1f} ms, released {tot_r * 1000:.1f} ms, ratio {tot_o / tot_r:.2f}")
        if same is not None:
            print(f"  embedding cosine ours vs released: {same:.6f}")
    print("\nreleased worst case = 4 detector sizes on the full photo + 1 re-detect at 640, all 5 models per face"
          " found: 5 detector passes, 13 model runs")
    if typical and worst:
        print(f"ours on the portrait vs released worst case measured: detector passes {typical[0]}/{worst[0]} = "
              f"{typical[0] / worst[0]:.2f}, model runs {typical[1]}/{worst[1]} = {typical[1] / worst[1]:.2f}")


if __name__ == "__main__":
    main()
