"""Benchmark: whole preprocessing of one 1024x1024 photo on this CPU (fake AntelopeV2 + random CLIP).

    python bench/bench_preprocess.py [--tiny-clip] [--repeats 2] [--smoke]

Prints, measured in this one process:

* time per stage (detector, 106-point landmarks, mask/blur crops, CLIP, ArcFace re-detection +
  recognition) of the first, uncached run;
* detector passes and model runs against the released recipe's worst case for one face
  (insightface ``FaceAnalysis.get`` with all five antelopev2 models loaded: retry 640/512/384/256,
  then every model per face, then a second ``get`` on the 4l crop; CLIP once for the ID crop and
  once for the base crop);
* the second run of the same photo (result cache) as a ratio of the first.

The fake ONNX models are far cheaper than the real ones, so the face stages' absolute times are
not the real ones; counts, ratios and the CLIP time (full-size ViT-L/14 unless ``--tiny-clip``)
are meaningful.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hyperlora import pipeline as pl  # noqa: E402
from hyperlora.faces import preprocess as pp  # noqa: E402
from hyperlora.encoders import ClipVisionEncoder  # noqa: E402
from hyperlora.faces.analysis import FaceAnalyzer  # noqa: E402
from tests.conftest import test_cache_root  # noqa: E402
from tests.fixtures.antelope import cached_antelopev2  # noqa: E402
from tests.fixtures.clip import full_vit_l14_file, make_clip_folder  # noqa: E402

# Released recipe, one photo with one face (format §6 and the authors' node graph):
RELEASED_MODELS_PER_FACE = 4     # FaceAnalysis.get runs landmark_2d_106, landmark_3d_68, genderage, recognition
RELEASED_WORST = {
    "detector_passes": 4 + 1,                                 # 640, 512, 384, 256, then 640 on the 4l crop
    "model_runs": (4 + 1) + 2 * RELEASED_MODELS_PER_FACE,     # + all per-face models in both get() calls
    "clip_forwards": 2,                                       # ID condition and base condition separately
}
RELEASED_BEST = {"detector_passes": 2, "model_runs": 2 + 2 * RELEASED_MODELS_PER_FACE, "clip_forwards": 2}


def photo_1024() -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((1024, 1024), Image.Resampling.BICUBIC))


class StageTimer:
    """Wraps the analyzer's and encoder's own calls to add up time per stage."""

    def __init__(self, analyzer: FaceAnalyzer, clip: ClipVisionEncoder) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.clip_forwards = 0
        self._wrap(analyzer, "_detect_raw", "detect")
        self._wrap(analyzer, "_landmarks", "landmarks")
        self._wrap(analyzer, "embedding", "arcface")
        self._wrap(clip, "forward", "clip")
        for name in ("clip_crop", "base_crop", "arcface_crop"):
            self._wrap(pp, name, "mask/blur/crops")

    def _wrap(self, owner: object, name: str, stage: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def timed(*args, **kwargs):
            start, detect_before = time.perf_counter(), self.seconds["detect"]
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                if stage == "arcface":       # its re-detection is already counted under "detect"
                    spent -= self.seconds["detect"] - detect_before
                self.seconds[stage] += spent
                if stage == "clip":
                    self.clip_forwards += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.clip_forwards = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny-clip", action="store_true", help="tiny random CLIP instead of full-size ViT-L/14")
    parser.add_argument("--repeats", type=int, default=2, help="uncached runs (median)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CLIP, one run: a quick run that the script works (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.tiny_clip, args.repeats = True, 1

    cache = test_cache_root()
    analyzer = FaceAnalyzer(cached_antelopev2(cache), provider="CPU")
    if args.tiny_clip:
        dirs = make_clip_folder(Path(tempfile.mkdtemp(prefix="bench-clip-")))
        clip = ClipVisionEncoder.from_pretrained(dirs.model, dirs.processor, require_vit_l14=False)
        clip_name = "tiny random CLIP"
    else:
        import torch

        clip = ClipVisionEncoder.from_single_file(full_vit_l14_file(cache), dtype=torch.float32)
        clip_name = "full-size random ViT-L/14 (fp32)"
    image = photo_1024()
    options = dict(analyzer=analyzer, clip=clip, need_id=True, need_clip=True, need_base=True)

    pl.clear_cache()
    pl.extract_conditions([image], use_cache=False, **options)          # warm-up (sessions, allocators)

    timer = StageTimer(analyzer, clip)
    firsts, stage_sum = [], defaultdict(float)
    for _ in range(args.repeats):
        pl.clear_cache()
        timer.reset()
        analyzer.stats.reset()
        start = time.perf_counter()
        cond = pl.extract_conditions([image], **options)
        firsts.append(time.perf_counter() - start)
        for k, v in timer.seconds.items():
            stage_sum[k] += v
    stats = analyzer.stats.as_dict()
    clip_forwards = timer.clip_forwards
    first = float(np.median(firsts))

    analyzer.stats.reset()
    timer.reset()
    seconds = []
    for _ in range(max(3, args.repeats)):
        start = time.perf_counter()
        pl.extract_conditions([image], **options)
        seconds.append(time.perf_counter() - start)
    second = float(np.median(seconds))
    cached_runs = analyzer.stats.model_runs + timer.clip_forwards

    print(f"HyperLoRA preprocessing of one 1024x1024 photo (astronaut), fake AntelopeV2 + {clip_name}")
    print(f"face: {cond.notes[0]}")
    print(f"\nfirst run (uncached), median of {args.repeats}: {first * 1000:.1f} ms")
    print(f"{'stage':<18}{'ms':>10}{'share':>9}")
    stages = ("detect", "landmarks", "mask/blur/crops", "clip", "arcface")
    for stage in stages:
        ms = stage_sum[stage] / args.repeats * 1000
        print(f"{stage:<18}{ms:>10.1f}{ms / (first * 1000):>9.1%}")
    other = first * 1000 - sum(stage_sum[s] for s in stages) / args.repeats * 1000
    print(f"{'other (hash, I/O)':<18}{other:>10.1f}{other / (first * 1000):>9.1%}")
    print("  (the ArcFace step's re-detection at 640 on the 4l crop is counted under 'detect')")

    ours = {"detector_passes": stats["detector_runs"], "model_runs": stats["model_runs"], "clip_forwards": clip_forwards}
    print("\nmodel runs per photo: ours vs released recipe (best case / worst case, one face)")
    print(f"{'':<18}{'ours':>6}{'best':>7}{'worst':>7}{'ours/worst':>12}")
    for key in ("detector_passes", "model_runs", "clip_forwards"):
        print(f"{key:<18}{ours[key]:>6}{RELEASED_BEST[key]:>7}{RELEASED_WORST[key]:>7}{ours[key] / RELEASED_WORST[key]:>12.2f}")
    print(f"  detector sizes used: {stats['det_sizes']}; landmark runs {stats['landmark_runs']}, "
          f"recognition runs {stats['recognition_runs']}")

    print(f"\nsecond run of the same photo (cache): median {second * 1000:.2f} ms, "
          f"ratio second/first = {second / first:.4f}, model runs {cached_runs}")


if __name__ == "__main__":
    main()
