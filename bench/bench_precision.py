"""Precision bench: the error of bf16 and fp16 against fp32, and each one's time, for one photo.

    python bench/bench_precision.py [--cache DIR] [--threads N] [--repeat R] [--smoke]

The workload is the Loader's: the released-size model (random weights, fp16 basis as stored), the
full-size ViT-L/14 (random weights), the tests' stand-in AntelopeV2 models and one photo (the
astronaut).  For each precision P in fp32, bf16, fp16, CLIP, the ID projector and the resampler run
in P (what the Loader's ``dtype`` gives; the basis stays fp16 as with ``auto``):

* relative error against fp32 (``||x_P - x_fp32|| / ||x_fp32||``, Frobenius norm) of the identity
  tokens and of the LoRA, the latter over every module's full weight update ``up @ down * alpha/rank``;
* the time of each stage (face analysis, CLIP, resampler, build; median of ``--repeat``).

The errors fill :data:`hyperlora.precision.MEASURED_REL_ERROR`; ``auto`` accepts a precision only
within :data:`hyperlora.precision.TOLERANCE`.  ``--smoke``: a small model and tiny CLIP, one round (CI).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hyperlora import precision  # noqa: E402
from hyperlora.bundle import identity_from_conditions, lora_from_identity  # noqa: E402
from hyperlora.checkpoint import load_hyper_lora  # noqa: E402
from hyperlora.encoders import ClipVisionEncoder  # noqa: E402
from hyperlora.faces.analysis import FaceAnalyzer  # noqa: E402
from hyperlora.generate import HyperLoRAModel, clear_token_cache  # noqa: E402
from hyperlora.lora import DOWN_SUFFIX, UP_SUFFIX, lora_prefixes  # noqa: E402
from hyperlora.pipeline import FaceConditions, clear_cache, extract_conditions  # noqa: E402

STAGES = ("face analysis", "CLIP", "resampler", "build")


@dataclass
class OnePhoto:
    """Result and stage times (seconds, one list entry per round) of identity + LoRA from one photo."""
    tokens: torch.Tensor
    lora: dict[str, torch.Tensor]
    seconds: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})

    def median(self, stage: str) -> float:
        return statistics.median(self.seconds[stage])

    def total(self) -> float:
        return sum(self.median(s) for s in STAGES)


def identity_and_lora(model: HyperLoRAModel, clip: ClipVisionEncoder, analyzer: FaceAnalyzer,
                      photo: np.ndarray, repeat: int) -> OnePhoto:
    """Identity + ID-LoRA of one photo, uncached, ``repeat`` rounds after one warm-up, per stage."""
    clip_seconds = [0.0]
    forward = clip.forward

    def timed_forward(pixels: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return forward(pixels)
        finally:
            clip_seconds[0] += time.perf_counter() - t0

    clip.forward = timed_forward   # type: ignore[method-assign]
    out: OnePhoto | None = None
    try:
        for round_ in range(repeat + 1):
            clear_cache()
            clip_seconds[0] = 0.0
            t0 = time.perf_counter()
            cond: FaceConditions = extract_conditions([photo], analyzer=analyzer, clip=clip, need_id=True,
                                                      need_clip=True, need_base=False, use_cache=False)
            t1 = time.perf_counter()
            clear_token_cache()
            ident = identity_from_conditions(model, cond, settings={})
            t2 = time.perf_counter()
            lora = dict(lora_from_identity(model, ident))
            t3 = time.perf_counter()
            if out is None:
                out = OnePhoto(tokens=ident.tokens, lora=lora)
            if round_ == 0:
                continue                       # warm-up
            out.seconds["face analysis"].append(t1 - t0 - clip_seconds[0])
            out.seconds["CLIP"].append(clip_seconds[0])
            out.seconds["resampler"].append(t2 - t1)
            out.seconds["build"].append(t3 - t2)
    finally:
        del clip.forward
    assert out is not None
    return out


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def lora_relative_error(lora: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Relative error over every module's weight update ``up @ down`` (one norm over all modules)."""
    num = den = 0.0
    for prefix in lora_prefixes(ref):
        d_ref = ref[prefix + UP_SUFFIX].double() @ ref[prefix + DOWN_SUFFIX].double().flatten(1)
        d = lora[prefix + UP_SUFFIX].double() @ lora[prefix + DOWN_SUFFIX].double().flatten(1)
        num += float((d - d_ref).pow(2).sum())
        den += float(d_ref.pow(2).sum())
    return (num / den) ** 0.5


def set_module_precision(model: HyperLoRAModel, dtype: torch.dtype) -> None:
    """Resampler, ID projector (and base resampler) in ``dtype``, as ``load_hyper_lora(resampler_dtype=)``."""
    for module in (model.resampler, model.id_projector, model.base_resampler):
        if module is not None:
            module.to(dtype)
    clear_token_cache()


@dataclass
class Fixtures:
    model_folder: Path
    clip_file: Path | None
    clip_folder: tuple[Path, Path] | None
    antelope: Path
    photo: np.ndarray
    description: str


def fixtures(cache: Path, *, smoke: bool) -> Fixtures:
    """The released-size workload, or (``smoke``) SDXL's modules at K=4 with a tiny CLIP."""
    from tests.comfy.models import SDXL_SMALL, astronaut
    from tests.fixtures.antelope import cached_antelopev2
    from tests.fixtures.clip import full_vit_l14_file, make_clip_folder
    from tests.fixtures.hyperlora_models import full_model_folder, write_hyperlora_folder

    antelope = cached_antelopev2(cache)
    if smoke:
        tmp = Path(tempfile.mkdtemp(prefix="bench_precision_"))
        folder = write_hyperlora_folder(tmp / "sdxl_small", preset=SDXL_SMALL, seed=1)
        dirs = make_clip_folder(tmp)
        return Fixtures(folder, None, (dirs.model, dirs.processor), antelope, astronaut(),
                        "SDXL's 140 modules at K=4 rank 2, tiny CLIP")
    return Fixtures(full_model_folder(cache), full_vit_l14_file(cache), None, antelope, astronaut(),
                    "released-size model, full-size ViT-L/14 (both random weights)")


def load_clip(fx: Fixtures, dtype: torch.dtype) -> ClipVisionEncoder:
    if fx.clip_file is not None:
        return ClipVisionEncoder.from_single_file(fx.clip_file, dtype=dtype)
    model_dir, processor = fx.clip_folder
    return ClipVisionEncoder.from_pretrained(model_dir, processor, dtype=dtype, require_vit_l14=False)


def measure(fx: Fixtures, names: list[str], repeat: int,
            log: Callable[[str], None] = lambda s: None) -> dict[str, OnePhoto]:
    """One :class:`OnePhoto` per precision name, one model (fp16 basis) and one analyzer for all."""
    model = load_hyper_lora(fx.model_folder, resampler_dtype=torch.float32)
    analyzer = FaceAnalyzer(fx.antelope, provider="CPU")
    results: dict[str, OnePhoto] = {}
    for name in names:
        dtype = precision.PRECISIONS[name]
        set_module_precision(model, dtype)
        clip = load_clip(fx, dtype)
        log(f"  {name}: measuring ...")
        results[name] = identity_and_lora(model, clip, analyzer, fx.photo, repeat)
        del clip
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="fixture cache (default: the tests' cache)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="small model, tiny CLIP, one round (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeat = 1
    torch.set_num_threads(args.threads)
    from tests.conftest import test_cache_root

    fx = fixtures(args.cache or test_cache_root(), smoke=args.smoke)
    features = precision.read_cpu_features()
    choice = precision.cpu_precision(features)
    sys.stdout.write(f"CPU: {features.model or 'unknown'} ({features.machine}, torch capability {features.capability}, "
                     f"{args.threads} threads, load average {os.getloadavg()[0]:.1f})\n"
                     f"matrix-relevant flags: {' '.join(sorted(f for f in features.flags if f.startswith(('avx', 'amx', 'f16c', 'fma')))) or 'none'}\n"
                     f"auto on this CPU: {choice.reason}\nworkload: {fx.description}, one photo\n")
    results = measure(fx, ["fp32", "bf16", "fp16"], args.repeat, log=lambda s: sys.stdout.write(s + "\n"))
    ref = results["fp32"]
    sys.stdout.write(f"\ntolerance of auto: {precision.TOLERANCE:g} relative error\n\n"
                     "| precision | identity tokens rel. error | LoRA rel. error | within tolerance | "
                     + " | ".join(STAGES) + " | total |\n|---|---|---|---|" + "---|" * (len(STAGES) + 1) + "\n")
    for name, r in results.items():
        tok = relative_error(r.tokens, ref.tokens)
        lora = lora_relative_error(r.lora, ref.lora)
        ok = max(tok, lora) <= precision.TOLERANCE
        times = " | ".join(f"{r.median(s) * 1000:.0f} ms" for s in STAGES)
        sys.stdout.write(f"| {name} | {tok:.2e} | {lora:.2e} | {'yes' if ok else 'NO'} | {times} | "
                         f"{r.total() * 1000:.0f} ms |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
