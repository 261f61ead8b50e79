"""The shard format: write/read, atomic writes, manifest rebuilt from finished shards, ShardDataset."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from hyperlora.errors import ModelFileError, SettingError
from hyperlora.train import shards
from hyperlora.train.data import ShardDataset
from hyperlora.train.filters import FilterReport


def _sample(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"arcface": torch.randn(512, generator=g), "clip_id": torch.randn(257, 16, generator=g),
            "clip_base": torch.randn(257, 16, generator=g), "latents": torch.randn(4, 8, 8, generator=g),
            "time_ids": torch.tensor([64.0, 80, 0, 8, 64, 64]), "text": torch.randn(77, 12, generator=g),
            "pooled": torch.randn(6, generator=g), "text_plain": torch.randn(77, 12, generator=g),
            "pooled_plain": torch.randn(6, generator=g)}


def _meta(i: int, identity: str) -> dict[str, str]:
    return {"key": f"k{i}", "identity": identity, "caption": f"caption {i}"}


@pytest.fixture()
def folder(tmp_path):
    report = FilterReport(seen=4, kept=3)
    report.drop("small")
    shards.write_shard(tmp_path / shards.shard_name(0), [_sample(0), _sample(1)], [_meta(0, "ann"), _meta(1, "bo")],
                       report=report, settings={"size": 64})
    shards.write_shard(tmp_path / shards.shard_name(1), [_sample(2)], [_meta(2, "ann")],
                       report=FilterReport(seen=1, kept=1), settings={"size": 64})
    shards.write_shard(tmp_path / shards.shard_name(2), [], [], report=FilterReport(seen=2), settings={"size": 64})
    shards.rebuild_manifest(tmp_path, planned=3, encoders={"clip_dim": 16}, sizes={"size": 64},
                            settings={"size": 64})
    return tmp_path


def test_write_read_round_trip_dtypes_and_metadata(folder):
    info = shards.read_shard_info(folder / shards.shard_name(0))
    assert info.count == 2 and [s["identity"] for s in info.samples] == ["ann", "bo"]
    assert info.report.dropped["small"] == 1 and info.settings == {"size": 64}
    assert info.shapes["clip_id"] == (2, 257, 16) and info.shapes["latents"] == (2, 4, 8, 8)
    from safetensors import safe_open

    with safe_open(str(folder / shards.shard_name(0)), framework="pt") as f:
        for key, dtype in shards.DTYPES.items():
            assert f.get_tensor(key).dtype == dtype
        assert torch.equal(f.get_tensor("arcface")[1], _sample(1)["arcface"])
        assert torch.equal(f.get_tensor("text")[0], _sample(0)["text"].half())
    empty = shards.read_shard_info(folder / shards.shard_name(2))
    assert empty.count == 0 and empty.shapes == {}


def test_manifest_from_finished_shards(folder):
    m = shards.read_manifest(folder)
    assert m.count == 3 and m.complete and m.planned == 3
    assert [s["file"] for s in m.shards] == [shards.shard_name(i) for i in range(3)]
    assert m.report["seen"] == 7 and m.report["kept"] == 4 and m.report["dropped"]["small"] == 1
    data = json.loads((folder / "manifest.json").read_text())
    assert data["format"] == "hyperlora.train.shards" and data["version"] == 1 and data["count"] == 3
    # a temporary file of an interrupted write is not a shard
    (folder / f".{shards.shard_name(3)}.tmp-123").write_bytes(b"partial")
    assert list(shards.finished_shards(folder)) == [0, 1, 2]
    m = shards.rebuild_manifest(folder, planned=5, encoders={}, sizes={}, settings={})
    assert not m.complete and m.count == 3


def test_manifest_errors_name_the_folder(tmp_path, folder):
    with pytest.raises(SettingError, match="does not exist"):
        shards.read_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="no manifest.json"):
        shards.read_manifest(tmp_path / "empty")
    (folder / shards.shard_name(1)).unlink()
    with pytest.raises(ModelFileError, match="shard-00001.safetensors .* is missing"):
        shards.read_manifest(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not readable JSON"):
        shards.read_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ModelFileError, match="version-1"):
        shards.read_manifest(folder)
    (folder / shards.shard_name(5)).write_bytes(b"\x00" * 16)
    with pytest.raises(ModelFileError, match="delete it"):
        shards.read_shard_info(folder / shards.shard_name(5))


def test_write_shard_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        shards.write_shard(tmp_path / shards.shard_name(0), [_sample(0)], [_meta(0, "a")])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no 'pooled'"):
        bad = _sample(1)
        del bad["pooled"]
        monkeypatch.undo()
        shards.write_shard(tmp_path / shards.shard_name(0), [bad], [_meta(0, "a")])


def test_dataset_rows_identity_filter_and_workers(folder):
    ds = ShardDataset(folder)
    assert len(ds) == 3 and ds.identities == ["ann", "bo"]
    item = ds[1]
    assert item["key"] == "k1" and item["identity"] == "bo" and item["caption"] == "caption 1"
    assert torch.equal(item["latents"], _sample(1)["latents"])
    assert torch.equal(item["clip_id"], _sample(1)["clip_id"].half())
    assert set(item) == set(shards.TENSOR_KEYS) | {"key", "identity", "caption"}
    ann = ShardDataset(folder, identities={"ann"})
    assert [ann[i]["key"] for i in range(len(ann))] == ["k0", "k2"]
    assert torch.equal(ann[1]["arcface"], _sample(2)["arcface"])
    with pytest.raises(IndexError):
        ann[2]
    with pytest.raises(SettingError, match="zed"):
        ShardDataset(folder, identities=["zed"])
    clone = pickle.loads(pickle.dumps(ds))          # DataLoader workers get a copy without open files
    assert torch.equal(clone[2]["text"], ds[2]["text"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    batches = list(loader)
    assert batches[0]["arcface"].shape == (2, 512) and batches[1]["key"] == ["k2"]


def test_sample_identities_and_other_photos(folder):
    """Identities are read from the index (ShardDataset, ConcatDataset); another photo is always one of the
    same identity, never the sample itself while the identity has another, and the ID features only change."""
    from hyperlora.train.data import OtherPhotos, sample_identities

    ds = ShardDataset(folder)
    assert sample_identities(ds) == ["ann", "bo", "ann"]
    both = torch.utils.data.ConcatDataset([ds, ShardDataset(folder, identities={"bo"})])
    assert sample_identities(both) == ["ann", "bo", "ann", "bo"]
    assert sample_identities([{"identity": "x"}, {"identity": 3}]) == ["x", "3"]   # any indexable dataset

    photos = OtherPhotos(ds)
    assert photos.groups == {"ann": [0, 2], "bo": [1]} and photos.singletons == 1
    gen = torch.Generator().manual_seed(0)
    assert {photos.pick(0, gen) for _ in range(20)} == {2} and {photos.pick(2, gen) for _ in range(20)} == {0}
    assert photos.pick(1, gen) == 1                     # bo has one photo: keeps its own
    out = photos.apply([ds[0], ds[1]], [0, 1], torch.Generator().manual_seed(0))
    assert torch.equal(out[0]["arcface"], ds[2]["arcface"]) and torch.equal(out[0]["clip_id"], ds[2]["clip_id"])
    assert torch.equal(out[0]["latents"], ds[0]["latents"]) and torch.equal(out[0]["clip_base"], ds[0]["clip_base"])
    assert out[0]["id_source"] == 2 and "id_source" not in out[1]
    assert torch.equal(out[1]["arcface"], ds[1]["arcface"])
    with pytest.raises(ValueError):
        photos.apply([ds[0]], [0, 1], gen)

    # uniform over the others: every other photo of a bigger group is drawn, the sample itself never
    many = OtherPhotos([{"identity": "a"}] * 5)
    g = torch.Generator().manual_seed(1)
    drawn = [many.pick(3, g) for _ in range(400)]
    assert set(drawn) == {0, 1, 2, 4} and min(drawn.count(k) for k in (0, 1, 2, 4)) > 60


def test_shuffled_photos_are_always_of_another_identity() -> None:
    """``across`` (the "shuffled" control): the ID features come from a photo of another identity, uniform over
    all their photos (never one of the sample's own identity, every other photo drawn); one identity is refused."""
    from hyperlora.errors import SettingError
    from hyperlora.train.data import OtherPhotos

    names = ["a", "b", "a", "c", "c", "c"]
    items = [{"identity": n, "arcface": torch.full((2,), float(i)), "clip_id": torch.full((1,), float(i))}
             for i, n in enumerate(names)]
    photos = OtherPhotos(items, across=True)
    g = torch.Generator().manual_seed(2)
    for i, own in enumerate(names):
        drawn = [photos.pick(i, g) for _ in range(300)]
        others = {j for j, n in enumerate(names) if n != own}
        assert set(drawn) == others, (i, set(drawn))
        assert min(drawn.count(j) for j in others) > 300 / len(others) / 2      # about uniform
    out = photos.apply(items[:2], [0, 1], torch.Generator().manual_seed(0))
    assert all(names[int(o["arcface"][0])] != names[k] for k, o in enumerate(out))
    assert all(o["arcface"][0] == o["clip_id"][0] == o["id_source"] for o in out)
    with pytest.raises(SettingError, match="shuffled.*two identities"):
        OtherPhotos([{"identity": "a"}] * 3, across=True)


@pytest.mark.parametrize("feature_dtype, tensor_bytes", [("mixed", 1_952_792), ("float16", 1_820_696)])
def test_bytes_per_sample_at_sdxl_sizes(tmp_path, feature_dtype: str, tensor_bytes: int) -> None:
    """The figure docs/training.md states: one sample at SDXL's sizes (1024 px latents 4 x 128 x 128, CLIP
    ViT-L/14 257 x 1024, text 77 x 2048, pooled 1280), measured on a written shard."""
    sample = {"arcface": torch.zeros(512), "clip_id": torch.zeros(257, 1024), "clip_base": torch.zeros(257, 1024),
              "latents": torch.zeros(4, 128, 128), "time_ids": torch.zeros(6), "text": torch.zeros(77, 2048),
              "pooled": torch.zeros(1280), "text_plain": torch.zeros(77, 2048), "pooled_plain": torch.zeros(1280)}
    shards.write_shard(tmp_path / shards.shard_name(0), [sample, sample], [_meta(0, "a"), _meta(1, "a")],
                       settings={"size": 1024}, dtypes=shards.stored_dtypes(feature_dtype))
    size = shards.folder_size(tmp_path)
    assert size.samples == 2 and size.shards == 1
    assert sum(size.tensor_bytes.values()) == tensor_bytes
    assert size.tensor_bytes["text"] + size.tensor_bytes["text_plain"] + 2 * size.tensor_bytes["pooled"] == 635_904
    assert tensor_bytes < size.per_sample < tensor_bytes + 1000           # plus its share of the JSON header
    assert shards.human_bytes(size.projected(4_400_000)) == ("8.59 TB" if feature_dtype == "mixed" else "8.01 TB")


def test_stored_dtypes_and_human_bytes() -> None:
    assert shards.stored_dtypes() == shards.DTYPES
    f16 = shards.stored_dtypes("float16")
    assert f16["time_ids"] == torch.float32 and {v for k, v in f16.items() if k != "time_ids"} == {torch.float16}
    with pytest.raises(SettingError, match="choose one of mixed, float16"):
        shards.stored_dtypes("float32")
    assert [shards.human_bytes(n) for n in (999, 1_000, 1_952_978, 8.593e12)] == ["999 B", "1 kB", "1.95 MB", "8.59 TB"]
