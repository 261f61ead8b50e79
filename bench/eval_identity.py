"""The paper's identity table on (photo, prompt) pairs, for one or more HyperLoRA models.

For every pair and model an image is generated (t2i_one_photo: the photo's identity LoRA at the given
strength, the prompt), then scored:

* ID sim: ArcFace cosine of the generated image's best-matching face to the photo's face
  (:mod:`hyperlora.similarity`: the identity's own AntelopeV2 recipe);
* CLIP-I: CLIP image-embedding cosine of the two face crops (the photo's face, the generated face;
  square crops around the face, background kept);
* CLIP-T: CLIP cosine of the prompt (trigger words removed) and the whole generated image;
* face-detection failure rate: generated images without a face ArcFace can read (they count in CLIP-T
  only).

Generation goes through a running ComfyUI (``--server``, the pack's queue client), or is skipped with
``--generated DIR`` (score images made elsewhere, ``DIR/<model>/<pair number>.png``, in this process).
Prints a table (means per model) and writes one CSV row per image (``--csv``).

    python bench/eval_identity.py --pairs pairs.csv --server http://127.0.0.1:8188 \\
        --models sdxl_hyper_id_lora_v1_fidelity sdxl_hyper_id_lora_v1_edit --checkpoint RealVisXL_V4.0.safetensors \\
        --insightface ComfyUI/models/insightface/models/antelopev2 --clip openai-clip-vit-large-patch14-folder
    python bench/eval_identity.py --smoke     # the plumbing on the test fixtures: stand-in faces, tiny CLIP

``pairs.csv``: columns ``photo,prompt`` (photo paths relative to the CSV).  ``--clip``: a transformers
CLIP folder (model + processor, e.g. openai/clip-vit-large-patch14 downloaded beforehand).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hyperlora import similarity as sim  # noqa: E402
from hyperlora.faces import preprocess as pp  # noqa: E402
from hyperlora.faces.analysis import FaceAnalyzer  # noqa: E402
from hyperlora.image_files import read_image  # noqa: E402
from hyperlora.spec import TRIGGER_PREFIX  # noqa: E402

COLUMNS = ("model", "pair", "photo", "prompt", "image", "face_found", "id_sim", "clip_i", "clip_t")


@dataclass
class Pair:
    photo: Path
    prompt: str


def read_pairs(path: Path) -> list[Pair]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"photo", "prompt"} <= set(rows[0]):
        raise SystemExit(f"{path}: expected a CSV with the columns photo,prompt")
    return [Pair((path.parent / r["photo"]).resolve(), r["prompt"]) for r in rows]


def rgb(path: Path) -> np.ndarray:
    return read_image(path)              # the size is checked before decoding


class Clip:
    """CLIP image / text embeddings (L2-normalised) from a transformers folder."""

    def __init__(self, folder: Path) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(folder)).eval()
        self.processor = CLIPProcessor.from_pretrained(str(folder))

    @torch.no_grad()
    def image(self, image: np.ndarray) -> torch.Tensor:
        px = self.processor(images=[np.array(image)], return_tensors="pt")["pixel_values"]
        e = self.model.get_image_features(pixel_values=px)
        e = getattr(e, "pooler_output", e)
        return torch.nn.functional.normalize(e[0].float(), dim=-1)

    @torch.no_grad()
    def text(self, text: str) -> torch.Tensor:
        tok = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True)
        e = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        e = getattr(e, "pooler_output", e)
        return torch.nn.functional.normalize(e[0].float(), dim=-1)


def face_crop(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The square face crop of the identity pipeline, background kept."""
    return pp.clip_crop(image, landmarks, remove_bg=False, grayscale=False)


def score_pair(pair: Pair, generated: Path, *, analyzer: FaceAnalyzer, clip: Clip) -> dict[str, object]:
    photo, image = rgb(pair.photo), rgb(generated)
    reference, _ = sim.reference_from_photos([photo], analyzer=analyzer)
    s = sim.score_image(image, reference, analyzer=analyzer)
    row: dict[str, object] = {"photo": str(pair.photo), "prompt": pair.prompt, "image": str(generated),
                              "face_found": s.score is not None, "id_sim": s.score, "clip_i": None}
    if s.score is not None:
        (ref_face,) = sim.image_faces(photo, analyzer=analyzer)[:1]
        a = clip.image(face_crop(photo, ref_face[0].landmarks_106))
        b = clip.image(face_crop(image, s.landmarks))
        row["clip_i"] = float(a @ b)
    text = pair.prompt[len(TRIGGER_PREFIX):] if pair.prompt.startswith(TRIGGER_PREFIX) else pair.prompt
    row["clip_t"] = float(clip.text(text) @ clip.image(image))
    return row


def generate(pairs: list[Pair], model: str, out: Path, args: argparse.Namespace) -> list[Path]:
    from hyperlora.tools.queue import queue_workflow

    paths = []
    for i, pair in enumerate(pairs, start=1):
        target = out / model / f"{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            got = queue_workflow("t2i_one_photo", server=args.server, images=[pair.photo], prompt=pair.prompt,
                                 seed=args.seed, strength=args.strength, model=model, checkpoint=args.checkpoint,
                                 steps=args.steps, width=args.size, height=args.size, overrides=args.set,
                                 out_dir=tmp)
            Image.open(got[0]).convert("RGB").save(target)
        paths.append(target)
    return paths


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarise(rows: list[dict[str, object]], models: list[str]) -> str:
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"{'model':<36} {'images':>6} {'ID sim':>7} {'CLIP-I':>7} {'CLIP-T':>7} {'no face':>8}"]
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        found = [r for r in mine if r["face_found"]]
        fail = 1 - len(found) / len(mine) if mine else None
        lines.append(f"{m:<36} {len(mine):>6} {fmt(mean([r['id_sim'] for r in found])):>7} "
                     f"{fmt(mean([r['clip_i'] for r in found])):>7} {fmt(mean([r['clip_t'] for r in mine])):>7} "
                     f"{'n/a' if fail is None else f'{100 * fail:.0f} %':>8}")
    return "\n".join(lines)


def smoke(tmp: Path) -> argparse.Namespace:
    """Fixtures for --smoke: stand-in faces (the same person and another one as 'generated' images)."""
    from tests.conftest import test_cache_root
    from tests.fixtures.antelope import blank_image, cached_antelopev2, face_image
    from tests.fixtures.clip import make_full_clip_folder

    def person(seed: int, cx: float = 128) -> np.ndarray:
        return face_image((256, 256), [(cx, 120, 120)], seeds=[seed])

    (tmp / "photos").mkdir()
    Image.fromarray(person(1)).save(tmp / "photos" / "a.png")
    Image.fromarray(person(2)).save(tmp / "photos" / "b.png")
    (tmp / "pairs.csv").write_text(f"photo,prompt\nphotos/a.png,{TRIGGER_PREFIX}a photo of a person\n"
                                   f"photos/b.png,{TRIGGER_PREFIX}a person in a garden\n")
    outputs = {"same_person": [person(1, 120), person(2, 136)], "other_person": [person(3), blank_image(256, 256)]}
    for model, images in outputs.items():
        (tmp / "generated" / model).mkdir(parents=True)
        for i, img in enumerate(images, start=1):
            Image.fromarray(img).save(tmp / "generated" / model / f"{i}.png")
    return argparse.Namespace(pairs=tmp / "pairs.csv", generated=tmp / "generated", server=None,
                              models=list(outputs), insightface=cached_antelopev2(test_cache_root()),
                              clip=make_full_clip_folder(tmp / "clip"), csv=tmp / "results.csv", provider="CPU")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=Path, help="CSV with columns photo,prompt")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--server", help="ComfyUI with this pack: generate through it (queue client)")
    src.add_argument("--generated", type=Path, help="score images already made: DIR/<model>/<pair number>.png")
    ap.add_argument("--models", nargs="+", default=[], help="HyperLoRA model folder names to compare")
    ap.add_argument("--checkpoint", help="SDXL checkpoint name on the server")
    ap.add_argument("--insightface", type=Path, help="the antelopev2 folder")
    ap.add_argument("--clip", type=Path, help="a transformers CLIP folder (model + processor)")
    ap.add_argument("--provider", default="auto", help="onnxruntime provider for the face models")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--strength", type=float, default=0.85)
    ap.add_argument("--set", action="append", default=[], help="extra workflow override 'Title.input=value'")
    ap.add_argument("--out", type=Path, default=Path("eval_out"), help="where generated images go")
    ap.add_argument("--csv", type=Path, default=Path("eval_identity.csv"))
    ap.add_argument("--smoke", action="store_true", help="the plumbing on the test fixtures (seconds)")
    args = ap.parse_args(argv)
    tmpdir = None
    if args.smoke:
        tmpdir = tempfile.TemporaryDirectory()
        args = smoke(Path(tmpdir.name))
    elif not (args.pairs and args.models and args.insightface and args.clip and (args.server or args.generated)):
        ap.error("--pairs, --models, --insightface, --clip and one of --server / --generated are needed")
    pairs = read_pairs(args.pairs)
    analyzer = FaceAnalyzer(args.insightface, provider=args.provider)
    clip = Clip(args.clip)
    rows: list[dict[str, object]] = []
    for model in args.models:
        if args.server:
            images = generate(pairs, model, args.out, args)
        else:
            images = [args.generated / model / f"{i}.png" for i in range(1, len(pairs) + 1)]
        for i, (pair, image) in enumerate(zip(pairs, images), start=1):
            rows.append({"model": model, "pair": i, **score_pair(pair, image, analyzer=analyzer, clip=clip)})
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS} for r in rows)
    print(summarise(rows, args.models))
    print(f"{len(rows)} rows written to {args.csv}")
    if tmpdir is not None:
        tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
