"""Source of truth of the shipped workflows: writes each one in both ComfyUI formats.

    python example_workflows/build_workflows.py --server http://127.0.0.1:8188

reads ``/object_info`` from a running ComfyUI that has this pack installed (for
widget order, socket types and defaults) and writes ``example_workflows/<name>.json``
(UI format: drag onto the canvas; ComfyUI also lists them in its template
browser) and ``example_workflows/api/<name>.json`` (API format: what ``POST /prompt``
and ``python -m hyperlora.tools.queue`` take), and ``hyperlora/tools/node_specs.json``
(the pack's node specs, which the workflow converter reads without a server).
``--object-info FILE`` uses a saved ``/object_info`` answer instead.
``--thumbnails DIR`` makes the Templates menu's ``<name>.jpg`` thumbnails from front-end screenshots
``DIR/<name>.png`` (as tests/comfy/test_frontend.py writes them with HYPERLORA_SCREENSHOT_DIR=DIR).
Only ComfyUI core nodes and this pack's nodes are used.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))   # the repository root, for hyperlora.tools.graph_format

from hyperlora.spec import NODE_PREFIX  # noqa: E402
from hyperlora.tools.graph_format import (  # noqa: E402,F401  (re-exported for the tests)
    CORE_NODES_IN_SPECS, NODE_SPECS_FILE, NOTE_WIDTH, VIRTUAL_NODES, Node, Out, Workflow, note_height, build,
    expected_widget_count, input_specs, is_widget, node_specs, widget_extras,
)

TRIGGER = "fcsks fxhks fhyks, "
PROMPT = TRIGGER + "portrait photo of a person, upper body, natural window light, 85mm lens, detailed skin"
NEGATIVE = "blurry, lowres, deformed face, bad anatomy, cartoon, watermark, text"
CHECKPOINT = "RealVisXL_V4.0.safetensors"
HYPER_MODEL = "sdxl_hyper_id_lora_v1_fidelity"
CLIP_VISION = "clip_vit_large_14"
INSIGHTFACE = "antelopev2"
CONTROLNET = "OpenPoseXL2.safetensors"
INSTANTID_CONTROLNET = "instantid/diffusion_pytorch_model.safetensors"
FACE_PROMPT = TRIGGER + "close-up photo of a face, detailed skin, natural light"
DIFFLORA_MODEL = "my_difflora"
"""The DiffLoRA workflows' model folder (``models/difflora/my_difflora``): none is released; train one with
``python -m hyperlora.train difflora-fit`` / ``difflora-export``, or the toy one with ``difflora-demo``."""
SEED = 42

RELEASE_NOTE = (
    "HyperLoRA turns face photos into an SDXL LoRA in about a second, no training.\n\n"
    "As the released weights expect (authors' defaults):\n"
    "- the positive prompt starts with the trigger words 'fcsks fxhks fhyks, '\n"
    "- CLIP Set Last Layer -2 (CLIP skip 2), as in training\n"
    "- LoRA strength 0.85 (0.75-0.85 typical; lower = more editable, higher for long prompts)\n"
    "- 1024x1024, 20 steps, dpmpp_2m + karras, CFG 5 (3-7 works)\n"
    "- base model: RealVisXL v4.0 works best (LEOSAM HelloWorld XL 3.0 and CyberRealistic XL 1.1 work too; "
    "ArienMixXL v4.0 does not)\n"
    "Models: python -m hyperlora.tools.download --models-dir ComfyUI/models (see the README tree).")


# --------------------------------------------------------------------------- building blocks

def base_model(wf: Workflow, *, x: float = 0, y: float = 0) -> tuple[Node, Node]:
    """Checkpoint + CLIP skip -2. Returns (checkpoint node, clip-skip node)."""
    ckpt = wf.add("CheckpointLoaderSimple", "Load SDXL checkpoint", (x, y), ckpt_name=CHECKPOINT)
    skip = wf.add("CLIPSetLastLayer", "CLIP skip -2 (as trained)", (x, y + 140), clip=ckpt[1], stop_at_clip_layer=-2)
    wf.group("SDXL model", [ckpt, skip], "#b58b2a")
    return ckpt, skip


def hyper_loader(wf: Workflow, *, x: float = 0, y: float = 300) -> Node:
    """The HyperLoRA Loader; a node under it starts 210 px lower (its two outputs make it that tall)."""
    return wf.add("HyperLoRAStudioLoader", "Load HyperLoRA", (x, y), model=HYPER_MODEL, clip_vision=CLIP_VISION,
                  insightface=INSIGHTFACE, dtype="auto", provider="auto")


def sampling(wf: Workflow, model: Out | Node, clip: Node, vae: Out, *, x: float, y: float = 0, prefix: str,
             conditioning: Callable[[Node, Node], tuple[Out, Out]] | None = None, text: str = PROMPT,
             batch_size: int = 1, pick: Callable[[Node], Out | Node] | None = None) -> list[Node]:
    """Prompts, empty latent, KSampler (authors' settings), decode, save. Returns the created nodes.

    ``pick(decode)`` puts a node between the decoded images and the save node (e.g. Best of N)."""
    pos = wf.add("CLIPTextEncode", "Positive prompt (starts with the trigger words)", (x, y), node_width=400,
                 clip=clip, text=text)
    neg = wf.add("CLIPTextEncode", "Negative prompt", (x, y + 230), node_width=400, clip=clip, text=NEGATIVE)
    latent = wf.add("EmptyLatentImage", "Image size" if batch_size == 1 else f"Image size, {batch_size} images",
                    (x, y + 440), node_width=400, width=1024, height=1024, batch_size=batch_size)
    p, n = conditioning(pos, neg) if conditioning else (pos[0], neg[0])
    sampler = wf.add("KSampler", "Sampler (authors' settings)", (x + 440, y), model=model, positive=p, negative=n,
                     latent_image=latent, seed=SEED, steps=20, cfg=5.0, sampler_name="dpmpp_2m",
                     scheduler="karras", denoise=1.0)
    decode = wf.add("VAEDecode", "Decode", (x + 440, y + 330), samples=sampler, vae=vae)
    images = pick(decode) if pick else decode
    save = wf.add("SaveImage", "Save image" if pick is None else "Save the kept images", (x + 800, y), node_width=420,
                  images=images, filename_prefix=prefix)
    wf.group("Generate", [pos, neg, latent, sampler, decode, save], "#3f789e")
    return [pos, neg, latent, sampler, decode, save]


def sampling_with_controlnet(wf: Workflow, model: Out | Node, clip: Node, ckpt: Node, control_net: Node,
                             image: Out | Node, *, title: str, pos: tuple[float, float], end_percent: float,
                             prefix: str) -> Node:
    """:func:`sampling` at x 760 with ControlNetApplyAdvanced (strength 0.8, from step 0 to ``end_percent``)
    between the prompts and the KSampler. Returns the ControlNet apply node."""
    holder: dict[str, Node] = {}

    def conditioning(positive: Node, negative: Node) -> tuple[Out, Out]:
        holder["cn"] = wf.add("ControlNetApplyAdvanced", title, pos, positive=positive, negative=negative[0],
                              control_net=control_net, image=image, vae=ckpt[2], strength=0.8, start_percent=0.0,
                              end_percent=end_percent)
        return holder["cn"][0], holder["cn"][1]

    sampling(wf, model, clip, ckpt[2], x=760, prefix=prefix, conditioning=conditioning)
    return holder["cn"]


def note(wf: Workflow, *, x: float = 0, y: float = -90) -> None:
    """The 'Read me' note, placed so that its bottom edge is at ``y``."""
    text = f"{wf.title}\n\n{wf.usage}\n\n{RELEASE_NOTE}"
    wf.add("Note", "Read me", (x, y - note_height(text)), node_width=NOTE_WIDTH, text=text)


def face_photo(wf: Workflow, title: str, pos: tuple[float, float], image: str) -> Node:
    return wf.add("LoadImage", title, pos, image=image)


def identity(wf: Workflow, hl: Node, images: Out | Node, title: str, pos: tuple[float, float]) -> Node:
    return wf.add("HyperLoRAStudioIdentityFromImages", title, pos, hyper_lora=hl, images=images, face_choice="largest",
                  face_index=0, remove_background=True, grayscale=False, no_face="skip", det_size="640")


def two_identities(wf: Workflow, hl: Node, first: tuple[str, str, str],
                   second: tuple[str, str, str]) -> tuple[Node, Node, Node, Node]:
    """Two photos, at (0, 510) and (0, 840), each with its identity beside it; ``first`` / ``second``
    are (photo title, image file, identity title). Returns (photo 1, photo 2, identity 1, identity 2)."""
    p1 = face_photo(wf, first[0], (0, 510), first[1])
    p2 = face_photo(wf, second[0], (0, 840), second[1])
    i1 = identity(wf, hl, p1, first[2], (380, 480))
    i2 = identity(wf, hl, p2, second[2], (380, 840))
    return p1, p2, i1, i2


def two_identity_loras(wf: Workflow, hl: Node, first: tuple[str, str, str],
                       second: tuple[str, str, str]) -> tuple[Node, Node, Node, Node, Node, Node]:
    """:func:`two_identities` plus 'Build LoRA A' / 'Build LoRA B' below them.
    Returns (photo 1, photo 2, identity 1, identity 2, LoRA A, LoRA B)."""
    p1, p2, i1, i2 = two_identities(wf, hl, first, second)
    la = wf.add("HyperLoRAStudioBuildLoRA", "Build LoRA A", (380, 1120), hyper_lora=hl, identity=i1, kind="id")
    lb = wf.add("HyperLoRAStudioBuildLoRA", "Build LoRA B", (380, 1250), hyper_lora=hl, identity=i2, kind="id")
    return p1, p2, i1, i2, la, lb


def apply_from_photo(wf: Workflow, model: Out, hl: Node, *, no_face: str = "skip") -> tuple[Node, Node]:
    """'Face photo' at (0, 510) and Apply from Images beside it (released face options). Returns both."""
    photo = face_photo(wf, "Face photo", (0, 510), "face.png")
    apply = wf.add("HyperLoRAStudioApplyFromImages", "Apply HyperLoRA from images", (380, 300), model=model,
                   hyper_lora=hl, images=photo, strength=0.85, face_choice="largest", face_index=0,
                   remove_background=True, grayscale=False, no_face=no_face, det_size="640")
    return photo, apply


# --------------------------------------------------------------------------- the workflows

def t2i_one_photo() -> Workflow:
    wf = Workflow("t2i_one_photo", "HyperLoRA: text to image from one face photo",
                  "one face photo -> identity LoRA -> SDXL text to image (single node: Apply from Images)",
                  "Load a clear, front-facing photo of one person in 'Face photo'. HyperLoRA Apply from Images "
                  "builds the LoRA and applies it to the model. 'Face crops' shows what the model saw.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    photo, apply = apply_from_photo(wf, ckpt[0], hl)
    crops = wf.add("PreviewImage", "Face crops the model saw", (380, 620), images=apply[1])
    wf.group("Identity", [hl, photo, apply, crops], "#8A8")
    sampling(wf, apply[0], skip, ckpt[2], x=760, prefix="HyperLoRA/t2i")
    return wf


def _identity_lora_chain(wf: Workflow, hl: Node, images: Out | Node, model: Out, *, x: float, y: float,
                         title: str = "Identity from photos") -> tuple[Node, Node, Node, Node]:
    ident = identity(wf, hl, images, title, (x, y))
    build = wf.add("HyperLoRAStudioBuildLoRA", "Build identity LoRA", (x, y + 270), hyper_lora=hl, identity=ident,
                   kind="id")
    apply = wf.add("HyperLoRAStudioApply", "Apply identity LoRA", (x, y + 400), model=model, lora=build, strength=0.85)
    crops = wf.add("PreviewImage", "Face crops the model saw", (x, y + 660), images=ident[1])
    return ident, build, apply, crops


def t2i_several_photos() -> Workflow:
    wf = Workflow("t2i_several_photos", "HyperLoRA: several photos of one person",
                  "three photos of one person -> one identity (mean over photos) -> text to image",
                  "Load three photos of the SAME person in 'Face photo 1-3'. Image Batch joins them (it resizes "
                  "photos 2 and 3 to the size of photo 1, keeping the aspect ratio by centre crop); the identity "
                  "is the mean over all photos, which gives a steadier likeness. Photos without a detected face "
                  "are skipped (no_face = skip).")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    p1 = face_photo(wf, "Face photo 1", (0, 510), "face_1.png")
    p2 = face_photo(wf, "Face photo 2", (0, 840), "face_2.png")
    p3 = face_photo(wf, "Face photo 3", (0, 1200), "face_3.png")
    b1 = wf.add("ImageBatch", "Batch photos 1+2", (380, 480), image1=p1, image2=p2)
    b2 = wf.add("ImageBatch", "Batch photos 1+2+3", (380, 620), image1=b1, image2=p3)
    ident, build, apply, crops = _identity_lora_chain(wf, hl, b2, ckpt[0], x=760, y=300)
    wf.group("Identity from three photos", [p1, p2, p3, b1, b2, hl, ident, build, apply, crops], "#8A8")
    sampling(wf, apply, skip, ckpt[2], x=1140, y=0, prefix="HyperLoRA/several_photos")
    return wf


def interpolate_two_people() -> Workflow:
    wf = Workflow("interpolate_two_people", "HyperLoRA: interpolation between two people",
                  "two people -> weighted mix of their identities -> text to image",
                  "Load person A and person B. Mix Identities blends them: weight_1 0.5 / weight_2 0.5 is half "
                  "way; 1.0 / 0.0 is person A alone. mode 'coefficients' mixes the HyperLoRA coefficients "
                  "(renormalised, like the authors' interpolation); 'weight_delta' mixes the finished LoRA "
                  "weights exactly.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    pa, pb, ia, ib = two_identities(wf, hl, ("Face photo A", "person_a.png", "Identity A"),
                                    ("Face photo B", "person_b.png", "Identity B"))
    mix = wf.add("HyperLoRAStudioMixIdentities", "Mix A and B", (760, 480), hyper_lora=hl, identity_1=ia, weight_1=0.5,
                 identity_2=ib, weight_2=0.5, mode="coefficients", weight_3=0.0, weight_4=0.0)
    apply = wf.add("HyperLoRAStudioApply", "Apply identity LoRA", (760, 800), model=ckpt[0], lora=mix, strength=0.85)
    wf.group("Two identities, mixed", [pa, pb, hl, ia, ib, mix, apply], "#8A8")
    sampling(wf, apply, skip, ckpt[2], x=1140, prefix="HyperLoRA/interpolation")
    return wf


def concept_slider() -> Workflow:
    wf = Workflow("concept_slider", "HyperLoRA: concept slider from a photo pair",
                  "original + edited photo of one person -> slider LoRA (edited minus original) on top of the identity",
                  "Load the same person twice: 'Original photo' and 'Edited photo' (for example the same photo "
                  "edited to smile, or to look older). The slider is the LoRA of the edited photo minus the LoRA "
                  "of the original; its strength is signed (negative goes the other way). The identity itself "
                  "comes from the original photo.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    po, pe, io_, ie = two_identities(wf, hl, ("Original photo", "original.png", "Identity (original)"),
                                     ("Edited photo", "edited.png", "Identity (edited)"))
    build = wf.add("HyperLoRAStudioBuildLoRA", "Build identity LoRA", (760, 480), hyper_lora=hl, identity=io_, kind="id")
    apply = wf.add("HyperLoRAStudioApply", "Apply identity LoRA", (760, 610), model=ckpt[0], lora=build, strength=0.85)
    slider = wf.add("HyperLoRAStudioConceptSlider", "Concept slider (edited - original)", (760, 870), hyper_lora=hl,
                    edited=ie, original=io_, strength=1.0)
    apply2 = wf.add("HyperLoRAStudioApply", "Apply slider LoRA", (760, 1030), model=apply, lora=slider, strength=1.0)
    wf.group("Identity and slider", [po, pe, hl, io_, ie, build, apply, slider, apply2], "#8A8")
    sampling(wf, apply2, skip, ckpt[2], x=1140, prefix="HyperLoRA/slider")
    return wf


def controlnet_pose() -> Workflow:
    wf = Workflow("controlnet_pose", "HyperLoRA with a pose ControlNet",
                  "one face photo + an OpenPose image -> identity LoRA + SDXL ControlNet (core nodes)",
                  "Load the face in 'Face photo' and a ready OpenPose skeleton image in 'Pose image' (core "
                  "ComfyUI has no pose detector; use an OpenPose render). Put an SDXL OpenPose ControlNet in "
                  "models/controlnet and select it. A ControlNet also steadies small faces.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    photo = face_photo(wf, "Face photo", (0, 510), "face.png")
    ident, build, apply, crops = _identity_lora_chain(wf, hl, photo, ckpt[0], x=380, y=300)
    wf.group("Identity", [hl, photo, ident, build, apply, crops], "#8A8")
    cn = wf.add("ControlNetLoader", "Load pose ControlNet (SDXL)", (760, 680), control_net_name=CONTROLNET)
    pose = wf.add("LoadImage", "Pose image", (760, 800), image="pose.png")
    apply_cn = sampling_with_controlnet(wf, apply, skip, ckpt, cn, pose, title="Apply pose ControlNet", pos=(1200, 680),
                                        end_percent=0.8, prefix="HyperLoRA/controlnet")
    wf.group("Pose ControlNet", [cn, pose, apply_cn], "#a1309b")
    return wf


def export_lora() -> Workflow:
    wf = Workflow("export_lora", "HyperLoRA: export the generated LoRA",
                  "face photo -> identity LoRA -> models/loras/hyperlora/my_face_00001_.safetensors (kohya format)",
                  "Queue it once: Export LoRA writes a standard kohya LoRA into models/loras/hyperlora/ "
                  "(my_face_00001_.safetensors, then _00002_, ...). Press R to refresh, then use it with the "
                  "core Load LoRA node (workflow reuse_exported_lora), in any UI or trainer: it is also a good "
                  "start for a short (about 50 steps) LoRA fine-tune.")
    note(wf)
    hl = hyper_loader(wf, y=0)
    photo = face_photo(wf, "Face photo", (0, 250), "face.png")
    ident = identity(wf, hl, photo, "Identity from photos", (380, 0))
    build = wf.add("HyperLoRAStudioBuildLoRA", "Build identity LoRA", (760, 0), hyper_lora=hl, identity=ident, kind="id")
    export = wf.add("HyperLoRAStudioExportLoRA", "Export LoRA to models/loras", (760, 140), lora=build,
                    filename_prefix="hyperlora/my_face", dtype="fp16")
    crops = wf.add("PreviewImage", "Face crops the model saw", (760, 340), images=ident[1])
    wf.group("Export", [hl, photo, ident, build, export, crops], "#8A8")
    return wf


def reuse_exported_lora() -> Workflow:
    wf = Workflow("reuse_exported_lora", "HyperLoRA: reuse an exported LoRA with the core Load LoRA node",
                  "exported LoRA file -> core LoraLoader -> text to image (no HyperLoRA model needed)",
                  "Pick the file written by export_lora (hyperlora/my_face_00001_.safetensors) in Load LoRA. "
                  "Only the UNet is changed (the LoRA has no text-encoder weights), so strength_clip has no "
                  "effect. This workflow needs neither the HyperLoRA model nor the face models.")
    note(wf)
    ckpt = wf.add("CheckpointLoaderSimple", "Load SDXL checkpoint", (0, 0), ckpt_name=CHECKPOINT)
    lora = wf.add("LoraLoader", "Load exported HyperLoRA LoRA", (0, 140), model=ckpt[0], clip=ckpt[1],
                  lora_name="hyperlora/my_face_00001_.safetensors", strength_model=0.85, strength_clip=1.0)
    skip = wf.add("CLIPSetLastLayer", "CLIP skip -2 (as trained)", (0, 360), clip=lora[1], stop_at_clip_layer=-2)
    wf.group("SDXL model with the exported LoRA", [ckpt, lora, skip], "#b58b2a")
    sampling(wf, lora[0], skip, ckpt[2], x=380, prefix="HyperLoRA/reused_lora")
    return wf


def identity_save() -> Workflow:
    wf = Workflow("identity_save", "HyperLoRA: save an identity file",
                  "face photo(s) -> identity file in output/hyper_lora_identities/ (+ an image with it)",
                  "Save Identity writes the identity (the HyperLoRA coefficients, a few KB) to "
                  "output/hyper_lora_identities/my_face_00001_.safetensors. Reload it later with identity_load: "
                  "no photo and no face analysis needed. An identity only fits the HyperLoRA model it was made "
                  "with.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    photo = face_photo(wf, "Face photo", (0, 510), "face.png")
    ident, build, apply, crops = _identity_lora_chain(wf, hl, photo, ckpt[0], x=380, y=300)
    save = wf.add("HyperLoRAStudioSaveIdentity", "Save identity file", (760, 700), identity=ident,
                  filename_prefix="my_face")
    wf.group("Identity, saved", [hl, photo, ident, build, apply, crops, save], "#8A8")
    sampling(wf, apply, skip, ckpt[2], x=760, prefix="HyperLoRA/identity_save")
    return wf


def identity_load() -> Workflow:
    wf = Workflow("identity_load", "HyperLoRA: reload a saved identity file",
                  "identity file -> identity LoRA -> text to image (no photo, no face analysis)",
                  "Pick a file saved by identity_save (my_face_00001_.safetensors) in Load Identity; press R "
                  "after saving to refresh the list. Use the same HyperLoRA model as when it was saved.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    load = wf.add("HyperLoRAStudioLoadIdentity", "Load identity file", (380, 300),
                  identity_file="my_face_00001_.safetensors")
    build = wf.add("HyperLoRAStudioBuildLoRA", "Build identity LoRA", (380, 420), hyper_lora=hl, identity=load, kind="id")
    apply = wf.add("HyperLoRAStudioApply", "Apply identity LoRA", (380, 560), model=ckpt[0], lora=build, strength=0.85)
    wf.group("Identity from file", [hl, load, build, apply], "#8A8")
    sampling(wf, apply, skip, ckpt[2], x=760, prefix="HyperLoRA/identity_load")
    return wf


def two_people() -> Workflow:
    wf = Workflow("two_people", "HyperLoRA: two different people in one image",
                  "two face photos -> two identities, each on its own half of the image (Identity on Prompt + masks)",
                  "Load person A (shown on the left) and person B (on the right). Each identity is put on its own "
                  "prompt with a mask (Identity on Prompt), so ComfyUI applies A's LoRA only to the left half and "
                  "B's only to the right half; the scene prompt covers the whole picture. The KSampler takes the "
                  "plain SDXL model. start_percent 0.0 / end_percent 1.0 apply the identities to every step; a "
                  "later start leaves more of the composition to the prompt. Move the masks for other layouts.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    pa, pb, ia, ib, la, lb = two_identity_loras(wf, hl, ("Face photo A (left)", "person_a.png", "Identity A"),
                                                ("Face photo B (right)", "person_b.png", "Identity B"))
    wf.group("Two identities", [pa, pb, hl, ia, ib, la, lb], "#8A8")
    empty = wf.add("SolidMask", "Empty mask", (760, 1120), value=0.0, width=1024, height=1024)
    half = wf.add("SolidMask", "Half-width mask", (760, 1270), value=1.0, width=512, height=1024)
    left = wf.add("MaskComposite", "Left half (person A)", (760, 1420), destination=empty, source=half, x=0, y=0,
                  operation="add")
    right = wf.add("MaskComposite", "Right half (person B)", (760, 1620), destination=empty, source=half, x=512,
                   y=0, operation="add")
    wf.group("Where each person is", [empty, half, left, right], "#a1309b")
    holder: dict[str, Node] = {}

    def conditioning(pos: Node, neg: Node) -> tuple[Out, Out]:
        text_a = wf.add("CLIPTextEncode", "Prompt for person A (left)", (1200, 700), node_width=400, clip=skip,
                        text=TRIGGER + "a person on the left, natural light")
        text_b = wf.add("CLIPTextEncode", "Prompt for person B (right)", (1200, 930), node_width=400, clip=skip,
                        text=TRIGGER + "a person on the right, natural light")
        on_a = wf.add("HyperLoRAStudioConditioning", "Identity A on the left", (1640, 700), positive=text_a, negative=neg,
                      lora=la, strength=0.85, start_percent=0.0, end_percent=1.0, mask=left, mask_strength=1.0,
                      set_cond_area="default")
        on_b = wf.add("HyperLoRAStudioConditioning", "Identity B on the right", (1640, 1110), positive=text_b,
                      negative=neg, lora=lb, strength=0.85, start_percent=0.0, end_percent=1.0, mask=right,
                      mask_strength=1.0, set_cond_area="default")
        scene_a = wf.add("ConditioningCombine", "Scene + person A", (2000, 700), conditioning_1=pos,
                         conditioning_2=on_a[0])
        both = wf.add("ConditioningCombine", "Scene + both people", (2000, 820), conditioning_1=scene_a,
                      conditioning_2=on_b[0])
        negs = wf.add("ConditioningCombine", "Negative for both people", (2000, 940), conditioning_1=on_a[1],
                      conditioning_2=on_b[1])
        holder["nodes"] = [text_a, text_b, on_a, on_b, scene_a, both, negs]
        return both[0], negs[0]

    sampling(wf, ckpt[0], skip, ckpt[2], x=760, prefix="HyperLoRA/two_people", conditioning=conditioning,
             text=TRIGGER + "photo of two people side by side, upper body, natural window light, detailed skin")
    wf.group("Identities on their regions", holder["nodes"], "#8A8")
    return wf


def face_inpaint() -> Workflow:
    wf = Workflow("face_inpaint", "HyperLoRA: re-paint the face in a photo with an identity",
                  "face photo + target photo -> only the target's face is re-painted with the identity, the rest "
                  "keeps its pixels",
                  "Load the person in 'Face photo' and the picture to change in 'Target photo'. Face Mask finds the "
                  "face in the target (grow 1.3 includes the forehead, feather softens the edge); "
                  "InpaintModelConditioning samples only inside the mask with the identity LoRA merged in, and "
                  "ImageCompositeMasked pastes the new face back so everything outside the mask keeps its original "
                  "pixels. denoise 0.75 keeps the pose and lighting; raise it towards 1.0 for a stronger change.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    photo, apply = apply_from_photo(wf, ckpt[0], hl, no_face="error")
    wf.group("Identity", [hl, photo, apply], "#8A8")
    target = face_photo(wf, "Target photo (face to re-paint)", (0, 840), "target.png")
    scaled = wf.add("ImageScaleToTotalPixels", "Scale target to about 1 megapixel", (380, 840), image=target,
                    upscale_method="lanczos", megapixels=1.0)
    mask = wf.add("HyperLoRAStudioFaceMask", "Face mask of the target", (380, 990), hyper_lora=hl, images=scaled,
                  face_choice="largest", face_index=0, grow=1.3, feather=8, no_face="error", det_size="640")
    wf.group("Target and its face", [target, scaled, mask], "#a1309b")
    pos = wf.add("CLIPTextEncode", "Positive prompt (starts with the trigger words)", (760, 0), node_width=400,
                 clip=skip, text=TRIGGER + "photo of a person, detailed skin, natural light")
    neg = wf.add("CLIPTextEncode", "Negative prompt", (760, 230), node_width=400, clip=skip, text=NEGATIVE)
    inpaint = wf.add("InpaintModelConditioning", "Sample only inside the mask", (760, 460), positive=pos,
                     negative=neg, vae=ckpt[2], pixels=scaled, mask=mask, noise_mask=True)
    sampler = wf.add("KSampler", "Sampler (authors' settings, denoise 0.75)", (1200, 0), model=apply, positive=inpaint[0],
                     negative=inpaint[1], latent_image=inpaint[2], seed=SEED, steps=20, cfg=5.0,
                     sampler_name="dpmpp_2m", scheduler="karras", denoise=0.75)
    decode = wf.add("VAEDecode", "Decode", (1200, 330), samples=sampler, vae=ckpt[2])
    paste = wf.add("ImageCompositeMasked", "Paste the new face into the target", (1200, 460), destination=scaled,
                   source=decode, x=0, y=0, resize_source=False, mask=mask)
    save = wf.add("SaveImage", "Save image", (1560, 0), node_width=420, images=paste,
                  filename_prefix="HyperLoRA/face_inpaint")
    wf.group("Re-paint the face", [pos, neg, inpaint, sampler, decode, paste, save], "#3f789e")
    return wf


def _face_pass(wf: Workflow, *, image: Out | Node, mask: Out, model: Out | Node, positive: Node, negative: Node,
               vae: Out, x: float, y: float, label: str) -> list[Node]:
    """Crop by the mask, re-render the crop with ``model`` inside the mask (denoise 0.5), paste it back.
    Returns the nodes; the last one is the paste (its output 0 is the new picture)."""
    crop = wf.add("HyperLoRAStudioCropByMask", f"Crop {label} (1024 px)", (x, y), image=image, mask=mask, padding=0.5,
                  size=1024)
    encode = wf.add("VAEEncode", f"Encode {label}", (x, y + 200), pixels=crop[0], vae=vae)
    noise_mask = wf.add("SetLatentNoiseMask", f"Re-paint only inside the mask ({label})", (x, y + 310),
                        samples=encode, mask=crop[1])
    sampler = wf.add("KSampler", f"Re-render {label} (denoise 0.5)", (x + 360, y), model=model, positive=positive,
                     negative=negative, latent_image=noise_mask, seed=SEED, steps=20, cfg=5.0, sampler_name="dpmpp_2m",
                     scheduler="karras", denoise=0.5)
    decode = wf.add("VAEDecode", f"Decode {label}", (x + 360, y + 330), samples=sampler, vae=vae)
    paste = wf.add("HyperLoRAStudioPasteByMask", f"Paste {label} back", (x + 720, y), destination=image,
                   image=decode, crop=crop[2])
    return [crop, encode, noise_mask, sampler, decode, paste]


def _face_prompts(wf: Workflow, clip: Node, *, x: float, y: float) -> tuple[Node, Node]:
    pos = wf.add("CLIPTextEncode", "Face re-paint prompt (starts with the trigger words)", (x, y), node_width=400,
                 clip=clip, text=FACE_PROMPT)
    neg = wf.add("CLIPTextEncode", "Face re-paint negative", (x, y + 230), node_width=400, clip=clip, text=NEGATIVE)
    return pos, neg


def instantid_controlnet() -> Workflow:
    wf = Workflow("instantid_controlnet", "HyperLoRA with InstantID's ControlNet (face keypoints)",
                  "face photo -> identity LoRA + InstantID's keypoint ControlNet (core ControlNet nodes, no InstantID "
                  "pack) -> text to image",
                  "The authors recommend pairing HyperLoRA with InstantID's ControlNet. Put InstantID's ControlNet "
                  "(ControlNetModel/diffusion_pytorch_model.safetensors of the InstantID release) in "
                  "models/controlnet/instantid/ and select it; no InstantID custom node pack is needed. Face "
                  "Keypoints draws the photo's five face keypoints the way that ControlNet was trained to see them, "
                  "here placed on a 1024x1024 canvas (mode 'canvas': centre and face width are fractions of the "
                  "canvas; keep width/height equal to the image size), so the face lands there; mode 'image' keeps "
                  "them where the face is in the photo. Identity comes from HyperLoRA. Note: InstantID itself also "
                  "feeds the face embedding through an IP-Adapter-like path and into the ControlNet's cross-attention; "
                  "here only the ControlNet part (the keypoints) is used, with the prompt as the ControlNet's text "
                  "conditioning. Face Analysis shows what was detected and which face was taken.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    photo, apply = apply_from_photo(wf, ckpt[0], hl)
    analysis = wf.add("HyperLoRAStudioFaceAnalysis", "Face analysis (what was found)", (380, 620), hyper_lora=hl,
                      images=photo, face_choice="largest", face_index=0, remove_background=True, grayscale=False,
                      det_size="640")
    shown = wf.add("PreviewImage", "Detected faces and crops", (380, 900), images=analysis[0])
    wf.group("Identity", [hl, photo, apply, analysis, shown], "#8A8")
    kps = wf.add("HyperLoRAStudioFaceKeypoints", "Face keypoints (InstantID style)", (760, 680), hyper_lora=hl,
                 images=photo, face_choice="largest", face_index=0, det_size="640", no_face="error", mode="canvas",
                 width=1024, height=1024, center_x=0.5, center_y=0.4, face_width=0.3)
    kps_shown = wf.add("PreviewImage", "Keypoint image", (760, 1060), images=kps)
    cn = wf.add("ControlNetLoader", "Load InstantID ControlNet", (1200, 680), control_net_name=INSTANTID_CONTROLNET)
    apply_cn = sampling_with_controlnet(wf, apply[0], skip, ckpt, cn, kps, title="Apply InstantID ControlNet",
                                        pos=(1200, 800), end_percent=1.0, prefix="HyperLoRA/instantid")
    wf.group("InstantID keypoint ControlNet", [kps, kps_shown, cn, apply_cn], "#a1309b")
    return wf


def face_detailer() -> Workflow:
    wf = Workflow("face_detailer", "HyperLoRA: text to image, then re-paint the face at full resolution",
                  "face photo -> identity -> text to image -> the face cropped, re-rendered at 1024 px with the "
                  "identity and pasted back (a FaceDetailer pass with core nodes and ours)",
                  "A face that is small in the picture gets few pixels and little likeness. After a normal text to "
                  "image with the identity, Face Mask finds the face, Crop by Mask cuts the square around it (with "
                  "context, padding 0.5) and scales it to 1024 px, a second KSampler re-renders it with the identity "
                  "(denoise 0.5: the pose and lighting stay; Set Latent Noise Mask keeps everything outside the mask), "
                  "and Paste by Mask scales it back and blends it in through the feathered mask. No third-party pack "
                  "is needed.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    photo, apply = apply_from_photo(wf, ckpt[0], hl)
    wf.group("Identity", [hl, photo, apply], "#8A8")
    made = sampling(wf, apply[0], skip, ckpt[2], x=760, prefix="HyperLoRA/face_detailer_before",
                    text=TRIGGER + "photo of a person standing in a park, full body, natural light")
    decoded = made[4]
    mask = wf.add("HyperLoRAStudioFaceMask", "Face mask of the picture", (760, 700), hyper_lora=hl, images=decoded,
                  face_choice="largest", face_index=0, grow=1.3, feather=8, no_face="skip", det_size="640")
    pos, neg = _face_prompts(wf, skip, x=760, y=960)
    nodes = _face_pass(wf, image=decoded, mask=mask[0], model=apply[0], positive=pos, negative=neg, vae=ckpt[2],
                       x=1200, y=700, label="the face")
    save = wf.add("SaveImage", "Save image (face re-painted)", (2280, 700), node_width=420, images=nodes[-1],
                  filename_prefix="HyperLoRA/face_detailer")
    wf.group("Face pass", [mask, pos, neg, *nodes, save], "#a1309b")
    return wf


def group_photo() -> Workflow:
    wf = Workflow("group_photo", "HyperLoRA: a group picture, then each face re-painted with its own identity",
                  "two face photos -> a picture of two people -> Face Masks (left to right) -> face 1 re-painted with "
                  "identity A, face 2 with identity B",
                  "Load person A and person B. The scene is generated first with the plain model; Face Masks then "
                  "finds the faces and numbers them left to right, and each face gets a FaceDetailer-style pass with "
                  "its own identity: Crop by Mask -> re-render at 1024 px with that identity merged in (denoise 0.5) "
                  "-> Paste by Mask, face 1 with A and face 2 with B. Set order to 'largest' to number them by size; "
                  "Face Masks has outputs for four faces (add passes for more). A face that is not found keeps its "
                  "pixels (its mask is empty).")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    pa, pb, ia, ib, la, lb = two_identity_loras(wf, hl, ("Face photo A (face 1)", "person_a.png", "Identity A"),
                                                ("Face photo B (face 2)", "person_b.png", "Identity B"))
    ma = wf.add("HyperLoRAStudioApply", "Model with identity A", (380, 1380), model=ckpt[0], lora=la, strength=0.85)
    mb = wf.add("HyperLoRAStudioApply", "Model with identity B", (380, 1640), model=ckpt[0], lora=lb, strength=0.85)
    wf.group("Two identities", [pa, pb, hl, ia, ib, la, lb, ma, mb], "#8A8")
    made = sampling(wf, ckpt[0], skip, ckpt[2], x=760, prefix="HyperLoRA/group_photo_scene",
                    text=TRIGGER + "photo of two people side by side, upper body, natural window light, detailed skin")
    decoded = made[4]
    masks = wf.add("HyperLoRAStudioFaceMasks", "Face masks, left to right", (760, 700), hyper_lora=hl, images=decoded,
                   order="left_to_right", grow=1.3, feather=8, det_size="640")
    pos, neg = _face_prompts(wf, skip, x=760, y=1000)
    first = _face_pass(wf, image=decoded, mask=masks[1], model=ma, positive=pos, negative=neg, vae=ckpt[2], x=1200,
                       y=700, label="face 1 (A)")
    second = _face_pass(wf, image=first[-1], mask=masks[2], model=mb, positive=pos, negative=neg, vae=ckpt[2],
                        x=1200, y=1150, label="face 2 (B)")
    save = wf.add("SaveImage", "Save image (faces re-painted)", (2280, 1150), node_width=420, images=second[-1],
                  filename_prefix="HyperLoRA/group_photo")
    wf.group("Each face with its identity", [masks, pos, neg, *first, *second, save], "#a1309b")
    return wf


def best_of_n() -> Workflow:
    wf = Workflow("best_of_n", "HyperLoRA: generate 8, keep the 2 most alike",
                  "one face photo -> identity LoRA -> 8 images -> Best of N keeps the 2 whose face is most like the "
                  "person (ArcFace similarity)",
                  "Load a clear photo of the person in 'Face photo'. The sampler makes 8 images (batch of 8); Best "
                  "of N scores each against the identity with the same face models the identity was made with and "
                  "keeps the 2 most alike, best first. Raise 'keep' or the batch size as you like; images without "
                  "a face come last. After a run, 'Ranking' shows every image's score and which were kept, 'Best "
                  "score' the first kept image's score, and 'HyperLoRA model info' what the Loader loaded.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    photo = face_photo(wf, "Face photo", (0, 510), "face.png")
    ident, build, apply, crops = _identity_lora_chain(wf, hl, photo, ckpt[0], x=380, y=300)
    info = loader_info(wf, hl)
    wf.group("Identity", [hl, photo, info, ident, build, apply, crops], "#8A8")
    holder: dict[str, Node] = {}

    def keep_best(decode: Node) -> Out:
        best = wf.add("HyperLoRAStudioBestOfN", "Keep the 2 most alike", (1200, 760), hyper_lora=hl, images=decode,
                      keep=2, face_choice="largest", face_index=0, det_size="640", identity=ident)
        holder["best"] = best
        return best[0]

    sampling(wf, apply, skip, ckpt[2], x=760, prefix="HyperLoRA/best_of_n", batch_size=8, pick=keep_best)
    best = holder["best"]
    ranking = wf.add("PreviewAny", "Ranking (every image's score)", (1560, 760), node_width=420, source=best[2])
    top = wf.add("PreviewAny", "Best score (first of the kept scores)", (1560, 1010), node_width=420, source=best[1])
    wf.group("Best of N", [best, ranking, top], "#a1309b")
    return wf


def loader_info(wf: Workflow, hl: Node) -> Node:
    """The Loader's ``info`` (model, CLIP, face models, file checks) shown under the face photo."""
    return wf.add("PreviewAny", "HyperLoRA model info", (0, 700), source=hl[1])


def refine_identity() -> Workflow:
    wf = Workflow("refine_identity", "HyperLoRA: refine an identity on the person's photos (50 steps)",
                  "face photo -> identity -> Refine Identity (50 fine-tuning steps, SDXL frozen) -> saved identity "
                  "file -> text to image",
                  "Load a photo of the person in 'Face photo' (more photos: batch them, as in t2i_several_photos). "
                  "The photo is scaled to 1024x1024 and encoded by the VAE; Refine Identity tunes the identity's "
                  "coefficients for 50 steps on it with the prompt 'fcsks fxhks fhyks, a photo of a person' (use a "
                  "class word that fits: man, woman, ...). 'Refine report' shows the denoising loss before and after "
                  "(and 'HyperLoRA model info' what the Loader loaded). "
                  "The refined identity is saved to output/hyper_lora_identities/my_face_refined_00001_.safetensors "
                  "and used for the image. mode 'lora' tunes the LoRA matrices instead (no identity file then). "
                  "Each step is a forward and backward pass of the SDXL UNet: use a GPU.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    photo = face_photo(wf, "Face photo", (0, 510), "face.png")
    ident = identity(wf, hl, photo, "Identity from photos", (380, 300))
    scaled = wf.add("ImageScale", "Photo at 1024x1024", (380, 620), image=photo, upscale_method="lanczos",
                    width=1024, height=1024, crop="center")
    encode = wf.add("VAEEncode", "Encode the photo", (380, 800), pixels=scaled, vae=ckpt[2])
    prompt = wf.add("CLIPTextEncode", "Prompt of the photos (trigger words + class word)", (380, 920), node_width=400,
                    clip=skip, text=TRIGGER + "a photo of a person")
    info = loader_info(wf, hl)
    wf.group("Identity and photos", [hl, photo, info, ident, scaled, encode, prompt], "#8A8")
    refine = wf.add("HyperLoRAStudioRefineIdentity", "Refine identity (50 steps)", (820, 620), model=ckpt[0],
                    hyper_lora=hl, identity=ident, latent=encode, positive=prompt, mode="coefficients", steps=50,
                    learning_rate=0.0, strength=0.85, seed=0)
    save = wf.add("HyperLoRAStudioSaveIdentity", "Save refined identity", (820, 1000), identity=refine[0],
                  filename_prefix="my_face_refined")
    apply = wf.add("HyperLoRAStudioApply", "Apply refined LoRA", (820, 1140), model=ckpt[0], lora=refine[1],
                   strength=0.85)
    wf.group("Refine", [refine, save, apply], "#a1309b")
    report = wf.add("PreviewAny", "Refine report (loss before and after)", (1260, 720), node_width=400,
                    source=refine[2])
    wf.group("Refine report", [report], "#a1309b")
    sampling(wf, apply, skip, ckpt[2], x=1260, prefix="HyperLoRA/refined")
    return wf


def difflora_loader(wf: Workflow, *, x: float = 0, y: float = 300) -> Node:
    return wf.add("HyperLoRAStudioDiffLoRALoader", "Load DiffLoRA", (x, y), model=DIFFLORA_MODEL, dtype="auto")


def difflora_best_of_n() -> Workflow:
    wf = Workflow("difflora_best_of_n", "DiffLoRA: 4 candidate LoRAs from a photo, keep the most alike",
                  "one face photo -> DiffLoRA samples 4 LoRAs (seeds 0-3) -> one image each -> Best of N keeps the "
                  "image whose face is most like the photo (ArcFace similarity)",
                  "DiffLoRA samples a LoRA for the person in 'Face photo'; each seed gives another candidate. Put a "
                  "DiffLoRA model folder in models/difflora (none is released: train one with python -m "
                  "hyperlora.train difflora-fit, or a toy one with difflora-demo) and choose it in 'Load DiffLoRA'. "
                  "'Load HyperLoRA' gives the face analysis and CLIP that read the photo (its HyperLoRA model is not "
                  "used). The 4 LoRAs come out as a list: Apply and the sampler run once per LoRA, and Best of N "
                  "ranks the 4 images against the photo and keeps the best. 'Ranking' shows every score.")
    note(wf)
    ckpt, skip = base_model(wf)
    hl = hyper_loader(wf)
    dl = difflora_loader(wf, y=510)
    photo = face_photo(wf, "Face photo", (0, 680), "face.png")
    loras = wf.add("HyperLoRAStudioDiffLoRAFromImages", "LoRA from Images (DiffLoRA), 4 candidates", (380, 300),
                   difflora=dl, hyper_lora=hl, images=photo, seed=0, batch_count=4, steps=30, guidance=1.0,
                   face_choice="largest", face_index=0, remove_background=True, grayscale=False, no_face="skip",
                   det_size="640")
    apply = wf.add("HyperLoRAStudioApply", "Apply each candidate LoRA", (380, 700), model=ckpt[0], lora=loras,
                   strength=0.85)
    crops = wf.add("PreviewImage", "Face crops DiffLoRA read", (380, 1000), images=loras[1])
    wf.group("DiffLoRA candidates", [hl, dl, photo, loras, apply, crops], "#8A8")
    holder: dict[str, Node] = {}

    def keep_best(decode: Node) -> Out:
        best = wf.add("HyperLoRAStudioBestOfN", "Keep the most alike", (1200, 760), hyper_lora=hl, images=decode,
                      keep=1, face_choice="largest", face_index=0, det_size="640", reference_images=photo)
        holder["best"] = best
        return best[0]

    sampling(wf, apply, skip, ckpt[2], x=760, prefix="DiffLoRA/best_of_n", pick=keep_best)
    best = holder["best"]
    ranking = wf.add("PreviewAny", "Ranking (every candidate's score)", (1560, 760), node_width=420, source=best[2])
    seeds = wf.add("PreviewAny", "Which seed each candidate has", (1560, 1010), node_width=420, source=loras[2])
    wf.group("Best of N", [best, ranking, seeds], "#a1309b")
    return wf


def difflora_new_person() -> Workflow:
    wf = Workflow("difflora_new_person", "DiffLoRA: a person who does not exist, kept for later",
                  "a seed -> DiffLoRA samples the LoRA of a new person (no photo) -> text to image; the LoRA is "
                  "saved, so the same character comes back in every picture",
                  "DiffLoRA's unconditional sample: the seed picks a person who does not exist. Put a DiffLoRA "
                  "model folder in models/difflora (none is released: train one with python -m hyperlora.train "
                  "difflora-fit, or a toy one with difflora-demo) and choose it in 'Load DiffLoRA'. The LoRA is "
                  "saved to models/loras/difflora/new_person_00001_.safetensors: load it with the core Load LoRA "
                  "node (or keep the seed) to put the same character in other pictures. Change the seed for "
                  "another person.")
    note(wf)
    ckpt, skip = base_model(wf)
    dl = difflora_loader(wf)
    person = wf.add("HyperLoRAStudioDiffLoRANewPerson", "New Person (DiffLoRA)", (380, 300), difflora=dl, seed=7,
                    batch_count=1, steps=30)
    apply = wf.add("HyperLoRAStudioApply", "Apply the new person's LoRA", (380, 560), model=ckpt[0], lora=person,
                   strength=0.85)
    export = wf.add("HyperLoRAStudioExportLoRA", "Save the person's LoRA", (380, 850), lora=person,
                    filename_prefix="difflora/new_person", dtype="fp16")
    info = wf.add("PreviewAny", "Seed and model", (0, 510), source=person[1])
    wf.group("New person", [dl, person, apply, export, info], "#8A8")
    sampling(wf, apply, skip, ckpt[2], x=760, prefix="DiffLoRA/new_person")
    return wf


ALL: tuple[Callable[[], Workflow], ...] = (t2i_one_photo, t2i_several_photos, interpolate_two_people, concept_slider,
                                          controlnet_pose, export_lora, reuse_exported_lora, identity_save,
                                          identity_load, two_people, face_inpaint, instantid_controlnet,
                                          face_detailer, group_photo, best_of_n, refine_identity,
                                          difflora_best_of_n, difflora_new_person)


def readme(workflows: list[Workflow]) -> str:
    lines = ["# Workflows", "",
             "Each workflow comes twice: `<name>.json` is the UI format (drag it onto the ComfyUI canvas; ComfyUI",
             "also lists these under Templates > ComfyUI-HyperLoRA-Studio, with the thumbnail `<name>.jpg`) and",
             "`api/<name>.json` the API format (`POST /prompt`, or `python -m hyperlora.tools.queue --workflow <name>`).",
             "They use only ComfyUI core nodes and this pack's nodes. Every one has a note with the settings the",
             "released weights expect: prompt starting with `fcsks fxhks fhyks, `, CLIP Set Last Layer -2,",
             "LoRA strength 0.85, 1024x1024, 20 steps, dpmpp_2m karras, CFG 5.",
             "Generated by `python example_workflows/build_workflows.py --server http://127.0.0.1:8188` (edit that file,",
             "not the JSON). Screenshots: `assets/screenshots/<name>.png`.", "",
             "| name | what it does | photo slots (`--image` order) |", "|---|---|---|"]
    for wf in workflows:
        slots = [n.title for n in wf.nodes if n.type == "LoadImage" and "photo" in n.title.lower()]
        lines.append(f"| `{wf.name}` | {wf.summary} | {', '.join(slots) or '-'} |")
    lines += ["", "Queue one from a shell while ComfyUI runs:", "", "```",
              "python -m hyperlora.tools.queue --workflow t2i_one_photo --image me.jpg \\",
              "    --prompt \"fcsks fxhks fhyks, a man in a space suit\" --seed 7 --strength 0.85 \\",
              "    --model sdxl_hyper_id_lora_v1_fidelity --checkpoint RealVisXL_V4.0.safetensors --out out/",
              "```", "",
              "`--pose pose.png` fills 'Pose image' of `controlnet_pose`; `--set 'Title.input=value'` sets any widget.",
              ""]
    return "\n".join(lines)


def fetch_object_info(server: str) -> dict[str, Any]:
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as resp:
        return json.loads(resp.read())


def build_all(object_info: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    return {wf.name: build(wf, object_info) for wf in (f() for f in ALL)}


def write_all(object_info: dict[str, Any], out_dir: Path = HERE) -> list[Path]:
    written = []
    (out_dir / "api").mkdir(exist_ok=True)
    for name, (ui, api) in build_all(object_info).items():
        for path, data in ((out_dir / f"{name}.json", ui), (out_dir / "api" / f"{name}.json", api)):
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(path)
    (out_dir / "README.md").write_text(readme([f() for f in ALL]), encoding="utf-8")
    NODE_SPECS_FILE.write_text(specs_json(object_info), encoding="utf-8")
    written.append(NODE_SPECS_FILE)
    return written


def specs_json(object_info: dict[str, Any]) -> str:
    """The saved specs of this pack's nodes (+ the core nodes the workflow converter writes)."""
    types = [t for t in object_info if t.startswith(NODE_PREFIX)] + list(CORE_NODES_IN_SPECS)
    return json.dumps(node_specs(object_info, types), indent=2, ensure_ascii=False) + "\n"


THUMBNAIL_WIDTH = 512
SCREENSHOT_CANVAS = (66, 80)
"""Left/top pixels of a front-end screenshot that are the side bar and the tab bar, not the canvas."""


def write_thumbnails(shot_dir: Path, out_dir: Path = HERE) -> list[Path]:
    """``out_dir/<name>.jpg`` for every workflow: its screenshot's canvas, THUMBNAIL_WIDTH wide."""
    from PIL import Image

    written = []
    for wf in (f() for f in ALL):
        with Image.open(shot_dir / f"{wf.name}.png") as shot:
            canvas = shot.convert("RGB").crop((*SCREENSHOT_CANVAS, shot.width, shot.height))
        height = round(canvas.height * THUMBNAIL_WIDTH / canvas.width)
        path = out_dir / f"{wf.name}.jpg"
        canvas.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(path, "JPEG", quality=82, optimize=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="running ComfyUI with this pack, e.g. http://127.0.0.1:8188")
    src.add_argument("--object-info", type=Path, help="saved /object_info JSON")
    src.add_argument("--thumbnails", type=Path, metavar="DIR", help="front-end screenshots DIR/<name>.png")
    args = p.parse_args(argv)
    if args.thumbnails:
        written = write_thumbnails(args.thumbnails)
    else:
        info = fetch_object_info(args.server) if args.server else json.loads(args.object_info.read_text())
        written = write_all(info)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
