"""``python -m hyperlora.train evaluate``: identity in generated pictures for a trained model folder.

For every identity: images with its own LoRA, another identity's and none (the same noise), scored by the
pack's face pipeline (:mod:`hyperlora.train.idsim`); writes ``OUT/eval.json`` and ``OUT/eval.png``. The CLI
lives apart from :mod:`hyperlora.train.evaluate` (the denoising-loss measures), which ``idsim`` and ``demo``
import, so no module imports back into its importer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import HyperLoRAError, SettingError
from .demo import CLIP_NAME, Tree
from .idsim import DEFAULT_PROMPTS, DEFAULT_SEEDS, evaluate_pictures, write_report
from .sampler import DEFAULT_STEPS


def _names(value: str | None) -> list[str]:
    return [n.strip() for n in (value or "").split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hyperlora.train evaluate",
        description="Identity in generated pictures: for every identity, images with its own LoRA, another "
                    "identity's and none (the same noise), scored by the pack's face pipeline (ArcFace cosine to the "
                    "reference photos = ID-sim; top-1 retrieval among the identities). Writes OUT/eval.json and "
                    "OUT/eval.png.")
    p.add_argument("--model", type=Path, required=True, help="a trained model folder (released layout, as fit exports)")
    p.add_argument("--references", type=Path, required=True,
                   help="held-out photos: one sub-folder of photos per identity (never used in training)")
    p.add_argument("--out", type=Path, required=True, help="folder for eval.json and eval.png")
    p.add_argument("--tree", type=Path, help="a ComfyUI models/ folder laid out as the demo writes it: gives --base, "
                   "--antelope, --clip and --clip-processor")
    p.add_argument("--base", type=Path, help="the SDXL base model the generator was trained on (diffusers folder or "
                   "single-file checkpoint)")
    p.add_argument("--antelope", type=Path, help="the AntelopeV2 folder (models/insightface/models/antelopev2)")
    p.add_argument("--clip", type=Path, help="the CLIP vision folder (models/hyper_lora/clip_vit/<name>)")
    p.add_argument("--clip-processor", type=Path, help="its processor folder (default: found beside it)")
    p.add_argument("--tokenizer", type=Path, help="CLIP tokenizer folder, for a single-file --base")
    p.add_argument("--identities", help="comma-separated identities to evaluate (default: every sub-folder)")
    p.add_argument("--unseen", help="comma-separated identities the model never trained on: reported as a group of "
                   "their own ('unseen'); the others form 'training'")
    p.add_argument("--seeds", default=",".join(str(s) for s in DEFAULT_SEEDS), help="comma-separated noise seeds")
    p.add_argument("--prompt", action="append", help=f"a prompt (repeatable; default: {len(DEFAULT_PROMPTS)} prompts "
                   "with different backgrounds); the trigger words are put in front")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps per image")
    return p


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Paths from the arguments (``--tree`` fills what is not given); SettingError naming what is missing."""
    paths: dict[str, Any] = {"base": args.base, "antelope": args.antelope, "clip": args.clip,
                             "clip_processor": args.clip_processor}
    if args.tree is not None:
        tree = Tree(Path(args.tree))
        defaults = {"base": tree.sdxl, "antelope": tree.antelope, "clip": tree.clip, "clip_processor": tree.clip_processor}
        paths = {k: v if v is not None else defaults[k] for k, v in paths.items()}
        if not tree.clip.is_dir() and args.clip is None:
            raise SettingError(f"--tree {args.tree} has no hyper_lora/clip_vit/{CLIP_NAME}; give --clip (and --base, "
                               f"--antelope) or point --tree at a folder the demo wrote.")
    for key in ("base", "antelope", "clip"):
        if paths[key] is None:
            raise SettingError(f"--{key} is missing; give it, or --tree with a models/ folder the demo wrote.")
        if not Path(paths[key]).exists():
            raise SettingError(f"--{key} {paths[key]} does not exist; give the right path.")
    for key, fix in (("model", "the trained model folder"),
                     ("references", "the folder of reference photos (one sub-folder per identity)")):
        if not Path(getattr(args, key)).is_dir():
            raise SettingError(f"--{key} {getattr(args, key)} is not a folder; give {fix}.")
    return paths


def main(argv: list[str] | None = None) -> int:
    """``evaluate --model DIR --references DIR --out DIR [--tree DIR | --base --antelope --clip] ...``."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = _resolve(args)
        found = sorted(p.name for p in Path(args.references).iterdir() if p.is_dir())
        names = _names(args.identities) or found
        missing = [n for n in names if n not in found]
        if missing:
            raise SettingError(f"no folder {Path(args.references) / missing[0]} for identity '{missing[0]}'; "
                               f"--identities must name sub-folders of --references ({', '.join(found) or 'none'}).")
        unseen = _names(args.unseen)
        wrong = [n for n in unseen if n not in names]
        if wrong:
            raise SettingError(f"--unseen names '{wrong[0]}', which is not among the evaluated identities "
                               f"({', '.join(names)}).")
        try:
            seeds = [int(s) for s in _names(args.seeds)]
        except ValueError:
            raise SettingError(f"--seeds {args.seeds!r} must be comma-separated whole numbers, e.g. 0,1,2.") from None
        if args.steps < 1:
            raise SettingError(f"--steps is {args.steps}; use 1 or more DDIM steps (20 is usual).")
        trained = [n for n in names if n not in unseen]
        groups = {k: v for k, v in (("training", trained), ("unseen", unseen)) if v} if unseen else {"all": names}
        result = evaluate_pictures(args.model, references=args.references, groups=groups, seeds=seeds,
                                   prompts=args.prompt or DEFAULT_PROMPTS, steps=args.steps, tokenizer=args.tokenizer,
                                   **paths)
        js, png = write_report(result, args.out)
    except HyperLoRAError as exc:
        sys.stderr.write(f"evaluate: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("evaluate: interrupted\n")
        return 130
    for name, g in result.groups.items():
        lo, hi = g.own_minus_other_ci
        sys.stdout.write(f"evaluate ({name}, {len(g.identities)} identities): {g.line()}; own - other "
                         f"{g.own_minus_other:+.4f} (95 % CI {lo:+.4f} .. {hi:+.4f}); retrieval own "
                         f"{g.retrieval_own:.2f}, other {g.retrieval_other:.2f}, none {g.retrieval_none:.2f} "
                         f"(chance {g.chance:.2f}); faces found {g.faces:.0%}\n")
    sys.stdout.write(f"evaluate: wrote {js} and {png}\n")
    sys.stdout.flush()
    return 0


__all__ = ["build_parser", "main"]
