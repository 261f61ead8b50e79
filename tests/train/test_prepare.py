"""prepare: A.5 filters on crafted inputs, kohya + webdataset inputs, the encoders' outputs, resume, shard split.

Real components at toy size: the fake AntelopeV2 (insightface on hand-weighted ONNX), the tiny CLIP vision
folder (the pack's ClipVisionEncoder), the tiny diffusers SDXL (VAE, two CLIP text encoders).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyperlora.errors import ImageInputError
from hyperlora.spec import TRIGGER_PREFIX
from hyperlora.train import prepare as prep
from hyperlora.train.data import ShardDataset
from hyperlora.train.filters import FilterReport
from hyperlora.train.shards import folder_size, human_bytes, read_manifest, shard_name
from hyperlora.train.toy.sdxl import tiny_sdxl_folder
from tests.fixtures.antelope import cached_antelopev2, face_image
from tests.fixtures.clip import make_clip_folder

SIDE = 168          # good images: 168 x 168, one face 84 px tall
MIN_SIDE = 128
SIZE = 64           # training crop for the tests: latents 8 x 8


class FixedScorer:
    """Pluggable aesthetic scorer: 5.5 (not above the threshold) for images 176 px wide, 9 otherwise."""

    name = "test"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, images):
        self.calls += 1
        return [5.5 if im.shape[1] == 176 else 9.0 for im in images]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _good(seed: int, width: int = SIDE) -> np.ndarray:
    return face_image((SIDE, width), [(width / 2, SIDE / 2, 84)], seeds=[seed])


def _put(folder: Path, name: str, image: np.ndarray | bytes, caption: str | None, meta: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.png").write_bytes(image if isinstance(image, bytes) else _png(image))
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption)
    if meta is not None:
        (folder / f"{name}.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def models(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("models")
    sdxl = tiny_sdxl_folder(root / "sdxl")
    clip = make_clip_folder(root)
    cfg = prep.PrepareConfig(sdxl=sdxl, clip=clip.model, clip_processor=clip.processor,
                             antelope=cached_antelopev2(cache_dir), min_side=MIN_SIDE, size=SIZE, shard_size=4,
                             batch_size=3, require_vit_l14=False)
    enc = prep.Encoders.load(cfg)
    enc.scorer = FixedScorer()
    return cfg, enc


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """A kohya folder with one sample per filter and good samples of three identities, and a webdataset tar."""
    root = tmp_path_factory.mktemp("data") / "people"
    _put(root / "alice", "a1", _good(1), "a photo of a woman")
    _put(root / "alice", "a2", _good(2), "a woman in a garden")
    _put(root / "bob", "b1", _good(3), "a man", meta={"identity": "robert"})
    _put(root / "bob", "b2", _good(4), "a man with a hat")
    _put(root / "filtered", "small", face_image((100, 100), [(50, 50, 60)]), "a small photo")
    _put(root / "filtered", "two_faces", face_image((SIDE, 336), [(84, 84, 84), (252, 84, 84)], seeds=[5, 6]),
         "two people")
    _put(root / "filtered", "tiny_face", face_image((400, 400), [(200, 200, 48)]), "a tiny face")
    _put(root / "filtered", "plural", _good(7), "We are at the beach with Our dog")
    _put(root / "filtered", "corrupt", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "broken file")
    _put(root / "filtered", "no_caption", _good(8), None)
    _put(root / "filtered", "no_face", face_image((SIDE, SIDE), []), "an empty room")
    _put(root / "filtered", "ugly", _good(9, width=176), "a dull photo")
    tar_path = root.parent / "laion-00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("000001.jpg", _jpg(_good(10)))
        add("000001.txt", b"a portrait of a person")
        add("000002.jpg", _jpg(_good(11)))
        add("000002.json", json.dumps({"caption": "a smiling person", "identity": "carol"}).encode())
        add("000003.jpg", b"not a jpeg at all")
        add("000003.txt", b"corrupt in the tar")
        add("000004.png", _png(_good(12)))
        add("000004.json", json.dumps({"caption": "they walk together"}).encode())
    return root, tar_path


def _jpg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def one_run(models, data, tmp_path_factory):
    """One prepare run over both inputs (shared by the tests that only read it)."""
    cfg, enc = models
    root, tar_path = data
    out = tmp_path_factory.mktemp("one") / "shards"
    return out, prep.prepare([root, tar_path], out, cfg, encoders=enc, show_progress=False)


def test_every_filter_counted_and_outputs_encoded(models, one_run):
    cfg, enc = models
    out, result = one_run
    m = read_manifest(out)
    assert m.report["seen"] == 16 and m.report["kept"] == 6
    assert m.report["dropped"] == {"corrupt": 2, "no_caption": 1, "small": 1, "plural_caption": 2, "no_face": 1,
                                   "many_faces": 1, "small_face": 1, "aesthetic": 1, "arcface": 0}
    assert m.complete and m.planned == 4 and m.count == 6 and result.written == [0, 1, 2, 3]
    assert m.encoders["clip_dim"] == 128 and m.encoders["text_dim"] == 64 and m.encoders["pooled_dim"] == 32
    assert m.sizes["latent"] == [4, 8, 8]

    ds = ShardDataset(out)
    by_key = {ds.meta(i)["key"]: i for i in range(len(ds))}
    assert set(by_key) == {"people/alice/a1", "people/alice/a2", "people/bob/b1", "people/bob/b2",
                           "laion-00000/000001", "laion-00000/000002"}
    assert ds.identities == ["000001", "alice", "bob", "carol", "robert"]
    item = ds[by_key["people/alice/a1"]]
    assert item["identity"] == "alice" and item["caption"] == "a photo of a woman"
    shapes = {k: tuple(v.shape) for k, v in item.items() if isinstance(v, torch.Tensor)}
    assert shapes == {"arcface": (512,), "clip_id": (257, 128), "clip_base": (257, 128), "latents": (4, 8, 8),
                      "time_ids": (6,), "text": (77, 64), "pooled": (32,), "text_plain": (77, 64),
                      "pooled_plain": (32,)}
    assert item["clip_id"].dtype == torch.float16 and item["latents"].dtype == torch.float32
    assert item["time_ids"].tolist() == [SIDE, SIDE, 0, 0, SIZE, SIZE]

    # the released preprocessing, reused: the same as the pipeline's conditions of that photo
    from hyperlora.pipeline import extract_conditions

    image = _good(1)
    conds = extract_conditions([image], analyzer=enc.analyzer, clip=enc.clip, need_id=True, need_clip=True,
                               need_base=True, use_cache=False)
    assert torch.allclose(item["arcface"], conds.id_embeds[0], atol=1e-6)
    assert abs(float(item["arcface"].norm()) - 1.0) < 1e-5
    assert torch.allclose(item["clip_id"].float(), conds.clip_features[0].half().float())
    assert torch.allclose(item["clip_base"].float(), conds.base_clip_features[0].half().float())
    assert not torch.allclose(item["clip_id"], item["clip_base"])
    crop, tids = prep.training_crop(image, SIZE)
    assert torch.allclose(item["latents"], prep.encode_latents(enc.vae, [crop])[0], atol=1e-3)  # batch of 3 vs 1
    text, pooled = enc.text.encode([TRIGGER_PREFIX + "a photo of a woman", "a photo of a woman"])
    assert torch.allclose(item["text"].float(), text[0].half().float())
    assert torch.allclose(item["pooled_plain"].float(), pooled[1].half().float())
    assert not torch.allclose(item["text"], item["text_plain"])

    only = ShardDataset(out, identities=["alice", "carol"])
    assert len(only) == 3 and set(only.identities) == {"alice", "carol"}
    batch = torch.utils.data.default_collate([only[0], only[1]])
    assert batch["latents"].shape == (2, 4, 8, 8) and len(batch["identity"]) == 2


def test_training_crop_and_time_ids():
    img = np.zeros((300, 200, 3), np.uint8)
    img[:, :, 0] = np.arange(300, dtype=np.uint8)[:, None] % 250
    crop, tids = prep.training_crop(img, 100)
    assert crop.shape == (100, 100, 3)
    assert tids == [300.0, 200.0, 25.0, 0.0, 100.0, 100.0]   # resized to 100 x 150, centre: top 25


def test_resume_redoes_nothing_and_interrupt_leaves_no_partial_shard(models, data, tmp_path):
    cfg, enc = models
    root, tar_path = data
    out = tmp_path / "shards"

    class InterruptingScorer(FixedScorer):   # Ctrl-C in the middle of the third shard (its aesthetic pass)
        def score(self, images):
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().score(images)

    normal = enc.scorer
    enc.scorer = InterruptingScorer()
    try:
        with pytest.raises(KeyboardInterrupt):
            prep.prepare([root, tar_path], out, cfg, encoders=enc, show_progress=False)
    finally:
        enc.scorer = normal
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", shard_name(0), shard_name(1)]    # no temporary / half shard
    m = read_manifest(out)
    assert not m.complete and [s["file"] for s in m.shards] == [shard_name(0), shard_name(1)]

    second = prep.prepare([root, tar_path], out, cfg, encoders=enc, show_progress=False)
    assert second.written == [2, 3] and second.skipped == [0, 1]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    calls_before = enc.scorer.calls
    third = prep.prepare([root, tar_path], out, cfg, encoders=enc, show_progress=False)
    assert third.written == [] and third.skipped == [0, 1, 2, 3]
    assert enc.scorer.calls == calls_before                             # no encoder ran
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == mtimes
    assert third.manifest.complete and third.manifest.count == 6 and third.manifest.report["seen"] == 16

    # other settings on resume are refused, naming them
    from hyperlora.errors import SettingError
    import dataclasses

    with pytest.raises(SettingError, match="min_side"):
        prep.prepare([root, tar_path], out, dataclasses.replace(cfg, min_side=64), encoders=enc, show_progress=False)
    with pytest.raises(SettingError, match="plan"):      # other inputs would shift samples between shards
        prep.prepare([root], out, cfg, encoders=enc, show_progress=False)


def test_shard_split_union_equals_one_run(models, data, one_run, tmp_path):
    cfg, enc = models
    root, tar_path = data
    one, split = one_run[0], tmp_path / "split"
    r0 = prep.prepare([root, tar_path], split, cfg, shard_index=0, num_shards=2, encoders=enc, show_progress=False)
    assert r0.written == [0, 2] and not r0.manifest.complete
    r1 = prep.prepare([root, tar_path], split, cfg, shard_index=1, num_shards=2, encoders=enc, show_progress=False)
    assert r1.written == [1, 3] and r1.manifest.complete
    a, b = ShardDataset(one), ShardDataset(split)
    assert len(a) == len(b) == 6
    assert read_manifest(one).report == read_manifest(split).report
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["key"] == y["key"]
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[k]), (x["key"], k)


def test_cli_errors_and_bad_settings(tmp_path, models):
    cfg, enc = models
    from hyperlora.errors import SettingError
    import dataclasses

    with pytest.raises(SettingError, match="neither a folder"):
        prep.prepare([tmp_path / "nope.zip"], tmp_path / "o", cfg, encoders=enc, show_progress=False)
    with pytest.raises(SettingError, match="shard-index"):
        prep.prepare([tmp_path], tmp_path / "o", cfg, shard_index=2, num_shards=2, encoders=enc)
    with pytest.raises(SettingError, match="size"):
        prep.prepare([tmp_path], tmp_path / "o", dataclasses.replace(cfg, size=100), encoders=enc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingError, match="No images"):
        prep.prepare([tmp_path / "empty"], tmp_path / "o", cfg, encoders=enc, show_progress=False)
    assert prep.main(["--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o2"), "--sdxl",
                      str(tmp_path / "missing"), "--clip", str(tmp_path), "--antelope", str(tmp_path)]) == 2


def test_cli_main_loads_the_encoders_and_reports(models, data, tmp_path, capsys):
    cfg, _ = models
    _, tar_path = data
    out = tmp_path / "cli"
    argv = ["--input", str(tar_path), "--out", str(out), "--sdxl", str(cfg.sdxl), "--clip", str(cfg.clip),
            "--clip-processor", str(cfg.clip_processor), "--antelope", str(cfg.antelope), "--min-side", "128",
            "--size", "64", "--shard-size", "2", "--no-vit-l14-check"]
    assert prep.main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    on_disk = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
    per = on_disk / 2
    assert line == (f"prepare: 2 samples in 2 of 2 shards -> {out}; {per:.0f} bytes per sample, "
                    f"{human_bytes(per * 4_400_000)} for 4,400,000 samples")
    size = folder_size(out)
    assert size.samples == 2 and size.shards == 2 and size.file_bytes == on_disk
    # the default feature set at the toy sizes (CLIP width 128, text 64, pooled 32, latents 4 x 8 x 8)
    assert size.tensor_bytes == {"arcface": 512 * 4, "clip_id": 257 * 128 * 2, "clip_base": 257 * 128 * 2,
                                 "latents": 4 * 8 * 8 * 4, "time_ids": 6 * 4, "text": 77 * 64 * 2, "pooled": 32 * 2,
                                 "text_plain": 77 * 64 * 2, "pooled_plain": 32 * 2}
    assert sum(size.tensor_bytes.values()) == 154_520 < per      # the rest: the shards' JSON headers
    m = read_manifest(out)
    assert m.encoders["aesthetic"] == "none" and m.report["dropped"]["corrupt"] == 1
    assert m.report["dropped"]["plural_caption"] == 1
    assert prep.main(argv + ["--project-to", "1000"]) == 0       # resumed: nothing to do, same manifest
    assert read_manifest(out).count == 2
    assert capsys.readouterr().out.strip().endswith(f"; {per:.0f} bytes per sample, {human_bytes(per * 1000)} for "
                                                    f"1,000 samples")
    assert prep.main(argv + ["--project-to", "0"]) == 2
    assert capsys.readouterr().err.strip() == "prepare: --project-to is 0; give a positive number of samples (e.g. 4400000)."


def test_default_split_follows_accelerate(monkeypatch):
    import accelerate

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert prep._default_split() == (0, 1, None)

    class FakeState:
        process_index, num_processes, device = 3, 8, "cuda:3"

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    assert prep._default_split() == (3, 8, "cuda:3")


def test_decode_applies_exif_orientation_and_rejects_garbage():
    img = Image.fromarray(np.zeros((100, 168, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6                       # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert prep.decode_image(buf.getvalue()).shape == (168, 100, 3)
    assert prep.decode_image(b"GIF89a" + b"\x00" * 10) is None
    assert prep.decode_image(b"") is None
    assert prep.decode_image(_png(np.zeros((5, 5, 3), np.uint8))[:40]) is None     # truncated PNG


def test_damaged_tar_gives_the_samples_before_the_damage(data, tmp_path):
    _, tar_path = data
    whole = prep.list_items([tar_path])
    assert [i.key for i in whole] == [f"laion-00000/00000{n}" for n in (1, 2, 3, 4)]
    cut = tmp_path / "laion-00001.tar"
    raw = tar_path.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2 + 100])
    part = prep.list_items([cut])
    assert 0 < len(part) < 4 and [i.key.split("/")[1] for i in part] == [i.key.split("/")[1] for i in whole[:len(part)]]


def test_a_photo_whose_crop_fails_is_dropped_not_the_batch(models, tmp_path, monkeypatch):
    import hyperlora.pipeline as pipeline
    from hyperlora.errors import ImageInputError

    cfg, enc = models
    root = tmp_path / "people"
    for name, seed in (("a1", 1), ("a2", 2)):
        _put(root / "alice", name, _good(seed), "a photo of a woman")
    _put(root / "bob", "b1", _good(3), "a man")
    real = pipeline.extract_conditions
    bad = _good(2)

    def failing(images, **kwargs):
        if any(im.shape == bad.shape and np.array_equal(im, bad) for im in images):
            raise ImageInputError("the base-condition crop is empty")
        return real(images, **kwargs)

    monkeypatch.setattr(pipeline, "extract_conditions", failing)
    prep.prepare([root], tmp_path / "s", cfg, encoders=enc, show_progress=False)
    ds = ShardDataset(tmp_path / "s")
    assert sorted(ds.meta(i)["key"] for i in range(len(ds))) == ["people/alice/a1", "people/bob/b1"]
    assert read_manifest(tmp_path / "s").report["dropped"]["arcface"] == 1
    a1 = next(ds[i] for i in range(len(ds)) if ds.meta(i)["key"] == "people/alice/a1")
    ref = real([_good(1)], analyzer=enc.analyzer, clip=enc.clip, need_id=True, need_clip=True, need_base=True,
               use_cache=False)
    assert torch.allclose(a1["arcface"], ref.id_embeds[0], atol=1e-6)


def test_two_processes_at_once_union_equals_one_run(models, data, tmp_path):
    """Two real processes (the CLI, --shard-index 0/1 of 2) writing into one folder at the same time give what
    one in-process run gives."""
    import dataclasses
    import os
    import subprocess
    import sys

    cfg, enc = models
    _, tar_path = data
    out, ref_out = tmp_path / "two", tmp_path / "one"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    base = [sys.executable, "-m", "hyperlora.train", "prepare", "--input", str(tar_path),
            "--out", str(out), "--sdxl", str(cfg.sdxl), "--clip", str(cfg.clip), "--clip-processor",
            str(cfg.clip_processor), "--antelope", str(cfg.antelope), "--min-side", str(MIN_SIDE), "--size",
            str(SIZE), "--shard-size", "2", "--batch-size", "3", "--no-vit-l14-check", "--num-shards", "2"]
    procs = [subprocess.Popen(base + ["--shard-index", str(k)], env=env, cwd=str(repo), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    prep.prepare([tar_path], ref_out, dataclasses.replace(cfg, shard_size=2), encoders=enc, show_progress=False)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    m = read_manifest(out)
    assert m.complete and len(m.shards) == 2 and m.report == read_manifest(ref_out).report
    two, one = ShardDataset(out), ShardDataset(ref_out)
    assert len(two) == len(one) == 2
    for i in range(len(one)):
        a, b = one[i], two[i]
        assert a["key"] == b["key"] and a["identity"] == b["identity"]
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                assert torch.allclose(v.float(), b[k].float(), atol=1e-3), (a["key"], k)


# ----------------------------------------------------------------------------- issue 19: data items


def test_crop_plan_moves_the_square_only_as_far_as_the_face_box_needs():
    # 320 x 128 (h x w) -> resized 160 x 64; the centre square starts at row 48 (rows 96..224 of the photo)
    assert prep.crop_plan(320, 128, 64) == prep.CropPlan(160, 64, 48, 0, False)
    assert prep.crop_plan(320, 128, 64, [20, 100, 100, 200]) == prep.CropPlan(160, 64, 48, 0, False)  # inside
    assert prep.crop_plan(320, 128, 64, [20, 18, 100, 102]) == prep.CropPlan(160, 64, 9, 0, True)     # 9 <= 18/2
    assert prep.crop_plan(320, 128, 64, [20, 250, 100, 318]) == prep.CropPlan(160, 64, 95, 0, True)   # ends at 159
    assert prep.crop_plan(320, 128, 64, [20, -30, 100, 60]) == prep.CropPlan(160, 64, 0, 0, True)     # clipped box
    assert prep.crop_plan(320, 128, 64, [0, 40, 128, 170]) is None          # 130 px > the 128 px the square shows
    assert prep.crop_plan(128, 320, 64, [250, 20, 318, 100]) == prep.CropPlan(64, 160, 0, 95, True)   # landscape
    with pytest.raises(ImageInputError, match="longer than a 64 px square crop"):
        prep.training_crop(np.zeros((320, 128, 3), np.uint8), 64, [0, 40, 128, 170])


def test_the_training_crop_keeps_a_face_near_the_edge(models, tmp_path):
    """A tall photo whose face is near the top: the centre crop would cut it (rows 96..224 of 320, face 18..102);
    prepare moves the square up to keep the detected face box, records the corner in the time ids and counts it;
    a face longer than the square is dropped and counted as face_cut; a centred face keeps the centre crop."""
    from hyperlora.pipeline import find_faces_scaled

    cfg, enc = models
    root = tmp_path / "people"
    near_top = face_image((320, 128), [(64, 60, 84)], seeds=[21])
    centred = face_image((320, 128), [(64, 160, 84)], seeds=[22])
    too_long = face_image((400, 140), [(70, 200, 150)], seeds=[23])
    _put(root / "p", "near_top", near_top, "a photo of a person")
    _put(root / "p", "centred", centred, "a photo of a person")
    _put(root / "p", "too_long", too_long, "a photo of a person")
    out = tmp_path / "s"
    prep.prepare([root], out, cfg, encoders=enc, show_progress=False)
    m = read_manifest(out)
    assert m.report["kept"] == 2 and m.report["dropped"]["face_cut"] == 1 and m.report["crop_moved"] == 1
    ds = ShardDataset(out)
    item = {ds.meta(i)["key"]: ds[i] for i in range(len(ds))}
    [face] = find_faces_scaled(enc.analyzer, near_top, det_size=cfg.det_size)
    x1, y1, x2, y2 = face.bbox
    assert y1 < 96 and 0 < y1 < y2 < 128                   # the centre crop would cut it; the moved one holds it
    top = item["people/p/near_top"]["time_ids"].tolist()[2]
    assert top == np.floor(y1 / 2) and top < 48              # moved up just enough (resized pixels: half)
    crop, tids = prep.training_crop(near_top, SIZE, face.bbox)
    assert tids == [320.0, 128.0, top, 0.0, 64.0, 64.0]
    assert torch.allclose(item["people/p/near_top"]["latents"], prep.encode_latents(enc.vae, [crop])[0], atol=1e-3)
    assert item["people/p/centred"]["time_ids"].tolist() == [320.0, 128.0, 48.0, 0.0, 64.0, 64.0]   # the centre
    [big] = find_faces_scaled(enc.analyzer, too_long, det_size=cfg.det_size)
    assert (big.bbox[3] - big.bbox[1]) > 140                # longer than the photo's width: no square holds it
    lines = FilterReport.from_dict(m.report).lines()
    assert "  dropped      1: face box longer than the square training crop (the crop would cut the face)" in lines
    assert lines[-1] == "  kept         1 with the training crop moved off the centre to keep the face"


def test_float16_features_are_smaller_and_fit_reads_them(models, data, one_run, tmp_path):
    """--feature-dtype float16: every tensor but the time ids stored float16 (the same values as the default
    shards, rounded), 1,536 bytes less per sample at the toy sizes; recorded in the settings (a resume with
    the other set is refused); fit reads both (float32 batches) and trains alike."""
    import copy
    import dataclasses

    from hyperlora.errors import SettingError
    from hyperlora.train.fit import collate, fit
    from hyperlora.train.toy.sdxl import tiny_unet

    from .test_fit import scheduler, toy_config

    cfg, enc = models
    root, tar_path = data
    mixed_out = one_run[0]
    out = tmp_path / "f16"
    prep.prepare([root, tar_path], out, dataclasses.replace(cfg, feature_dtype="float16"), encoders=enc,
                 show_progress=False)
    assert read_manifest(out).settings["feature_dtype"] == "float16"
    assert "feature_dtype" not in read_manifest(mixed_out).settings            # the default: as before
    a, b = ShardDataset(mixed_out), ShardDataset(out)
    assert len(a) == len(b) == 6
    for i in range(len(a)):
        for k, v in a[i].items():
            if isinstance(v, torch.Tensor):
                want = torch.float32 if k == "time_ids" else torch.float16
                assert b[i][k].dtype == want and torch.equal(b[i][k], v.to(want)), k
    small, big = folder_size(out), folder_size(mixed_out)
    assert sum(big.tensor_bytes.values()) - sum(small.tensor_bytes.values()) == 512 * 2 + 4 * 8 * 8 * 2
    assert small.tensor_bytes["arcface"] == 1024 and small.tensor_bytes["latents"] == 512

    batch = collate([b[0], a[1]], torch.device("cpu"))                      # the two sets mix too
    assert all(t.dtype == torch.float32 for t in batch.values())
    assert torch.equal(batch["latents"][0], a[0]["latents"].half().float())
    unet = tiny_unet(seed=0).requires_grad_(False).eval()
    trained = {}
    for name, folder in (("mixed", mixed_out), ("f16", out)):
        run_cfg = toy_config(tmp_path / name, stages=[{"stage": 2, "steps": 1}], checkpoint_every=0)
        run_cfg.shards = [str(folder)]
        res = fit(run_cfg, unet=copy.deepcopy(unet), noise_scheduler=scheduler())
        assert res.steps == 1 and all(0 < v < 1e3 for v in res.last_losses.values())
        trained[name] = res.last_losses
    assert trained["f16"].keys() == trained["mixed"].keys()
    for s, v in trained["mixed"].items():
        assert trained["f16"][s] == pytest.approx(v, rel=1e-2)
    with pytest.raises(SettingError, match="feature_dtype"):
        prep.prepare([root, tar_path], mixed_out, dataclasses.replace(cfg, feature_dtype="float16"), encoders=enc,
                     show_progress=False)
    with pytest.raises(SettingError, match="feature_dtype"):
        prep.prepare([root], tmp_path / "x", dataclasses.replace(cfg, feature_dtype="int8"), encoders=enc)


def test_base_crop_follows_the_spec_and_is_configurable(models, tmp_path, capsys):
    """The Base branch's CLIP features are those of format §6's Base crop: the blurred face cut around the face
    box with per-side scales (1,1,1,1 by default, as released); --base-scales changes that crop only."""
    import dataclasses

    from hyperlora.errors import SettingError
    from hyperlora.faces import preprocess as pp
    from hyperlora.pipeline import extract_conditions, find_faces_scaled

    cfg, enc = models
    root = tmp_path / "people"
    image = face_image((SIDE, 260), [(110, 84, 70)], seeds=[31])
    _put(root / "p", "one", image, "a photo of a person")
    items = {}
    for name, scales in (("default", prep.DEFAULT_BASE_SCALES), ("wide", (2.0, 2.5, 1.0, 3.0))):
        prep.prepare([root], tmp_path / name, dataclasses.replace(cfg, base_scales=scales), encoders=enc,
                     show_progress=False)
        items[name] = ShardDataset(tmp_path / name)[0]
    assert "base_scales" not in read_manifest(tmp_path / "default").settings
    assert read_manifest(tmp_path / "wide").settings["base_scales"] == [2.0, 2.5, 1.0, 3.0]
    [face] = find_faces_scaled(enc.analyzer, image, det_size=cfg.det_size)
    for name, scales in (("default", (1.0, 1.0, 1.0, 1.0)), ("wide", (2.0, 2.5, 1.0, 3.0))):
        crop = pp.base_crop(image, face.landmarks_106, scales)
        ref = extract_conditions([image], analyzer=enc.analyzer, clip=enc.clip, need_id=True, need_clip=True,
                                 need_base=True, base_scales=scales, use_cache=False)
        assert np.array_equal(ref.base_crops[0], crop)                    # the spec's crop is what CLIP saw
        assert torch.equal(items[name]["clip_base"], ref.base_clip_features[0].half()), name
    wide_crop = pp.base_crop(image, face.landmarks_106, (2.0, 2.5, 1.0, 3.0))
    assert wide_crop.shape[0] > pp.base_crop(image, face.landmarks_106).shape[0]
    assert not torch.equal(items["default"]["clip_base"], items["wide"]["clip_base"])
    for k in ("arcface", "clip_id", "latents", "text"):                   # nothing else changes
        assert torch.equal(items["default"][k], items["wide"][k]), k
    with pytest.raises(SettingError, match="--base-scales"):
        prep.prepare([root], tmp_path / "bad", dataclasses.replace(cfg, base_scales=(1.0, -1.0, 1.0, 1.0)),
                     encoders=enc)
    assert prep.main(["--input", str(root), "--out", str(tmp_path / "o"), "--sdxl", str(cfg.sdxl), "--clip",
                      str(cfg.clip), "--antelope", str(cfg.antelope), "--base-scales", "1,2"]) == 2
    assert capsys.readouterr().err.startswith("prepare: --base-scales (base_scales) is '1,2'; give four ")


def test_help_states_the_aesthetic_default():
    text = " ".join(prep.build_parser().format_help().split())
    assert "'none' (the default: the filter is OFF and every score passes)" in text
    assert "(default: none)" in text and "(default: 5.5)" in text and "(default: mixed)" in text
    assert "(default: 1,1,1,1)" in text and "(default: 4400000)" in text
