"""``python -m hyperlora.train difflora-dataset``: one plain LoRA per identity (DiffLoRA's training set).

One QUICK toy (demo.prepare_toy) is prepared per module; every test fits its 4 identities with a few steps.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.train.torchrun import run_two

ROOT = Path(__file__).resolve().parents[2]
STEPS, LR, RANK, BATCH = 6, 1e-2, 4, 8


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    pytest.importorskip("diffusers")
    from hyperlora.train import demo

    root = tmp_path_factory.mktemp("difflora_toy")
    # the toy VAE's trained decoder only draws pictures; the shards come from its (unchanged) encoder, so
    # this module does not pay its one-off training (minutes) when the cache is cold
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("hyperlora.train.toy.decoder.install_decoder", lambda *a, **k: Path("not needed"))
        prep = demo.prepare_toy(root / "tree", size=demo.QUICK, progress=False)
    return prep, root


def _cfg(prep, **kw):
    from hyperlora.train.difflora_dataset import DatasetConfig

    base = {"base_model": str(prep.tree.sdxl), "shards": [str(prep.train_set.folder)], "rank": RANK, "steps": STEPS,
            "lr": LR, "batch_size": BATCH}
    base.update(kw)
    return DatasetConfig(**base)


def _build(prep, out, **kw):
    from hyperlora.train.difflora_dataset import build_dataset

    stop = kw.pop("stop", None)
    return build_dataset(_cfg(prep, **kw), out, unet=prep.unet, noise_scheduler=prep.scheduler, split=(0, 1),
                         stop=stop)


@pytest.fixture(scope="module")
def built(toy):
    prep, root = toy
    out = root / "dataset"
    res = _build(prep, out)
    return prep, root, out, res


def _samples(prep, name):
    ds = prep.train_set
    return [ds[i] for i in range(len(ds)) if ds.meta(i)["identity"] == name]


def _loss(prep, name, lora):
    from hyperlora.lora_functional import factors_from_lora
    from hyperlora.train.evaluate import denoising_losses

    f = None if lora is None else factors_from_lora(lora)
    return float(denoising_losses(prep.unet, prep.scheduler.alphas_cumprod, _samples(prep, name), f, seed=3).mean())


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_one_lora_per_identity_lowers_its_loss(built):
    from hyperlora.lora_file import load_lora_file, read_lora_metadata
    from hyperlora.train.difflora_dataset import FORMAT, sha256_file

    prep, _, out, res = built
    names = prep.train_set.identities
    assert len(names) == 4 and res.fitted == names and res.skipped == [] and not res.interrupted
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["complete"] is True and manifest["identities_total"] == 4
    assert sorted(manifest["identities"]) == names
    layout = manifest["layout"]
    assert layout["rank"] == RANK and layout["alpha"] == RANK / 2
    # default target modules: all eight attention projections of every attention module
    assert {m["prefix"].rsplit("_attn", 1)[1] for m in layout["modules"]} == {
        f"{a}_{l}" for a in ("1", "2") for l in ("to_q", "to_k", "to_v", "to_out_0")}
    for name in names:
        entry = manifest["identities"][name]
        path = out / f"{name}.safetensors"
        assert entry["file"] == path.name and entry["sha256"] == sha256_file(path)
        lora = load_lora_file(path)                    # the pack's strict LoRA loader (Apply / Export read it)
        assert len(lora) == 3 * len(layout["modules"])
        for m in layout["modules"]:
            assert lora[m["prefix"] + ".lora_down.weight"].shape == (RANK, m["in"])
            assert lora[m["prefix"] + ".lora_up.weight"].shape == (m["out"], RANK)
            assert lora[m["prefix"] + ".lora_down.weight"].dtype == torch.float32
        meta = read_lora_metadata(path)
        assert meta["difflora_identity"] == name and meta["difflora_steps"] == str(STEPS)
        assert meta["difflora_rank"] == str(RANK) and meta["difflora_init"] == "random"
        assert float(meta["difflora_loss"]) == entry["loss"] and json.loads(meta["difflora_config"])["lr"] == LR
        assert "identities" not in json.loads(meta["difflora_config"])
        # measured independently (other noise seed): the identity's own LoRA lowers its denoising loss
        fitted, none = _loss(prep, name, lora), _loss(prep, name, None)
        assert fitted < none, (name, fitted, none)
        # random start: up is zero, so "before fitting" is exactly "no LoRA"
        assert entry["loss_start"] == entry["loss_none"] and entry["loss"] < entry["loss_start"]


def test_the_folder_is_difflora_fits_dataset_with_each_identitys_mif(built):
    """difflora-dataset writes <identity>.mif.safetensors beside each LoRA, so difflora-fit reads the folder as it is;
    each MIF is the identity's samples' mean (unit) ArcFace embedding and its pooled CLIP tokens."""
    import torch.nn.functional as F

    from hyperlora.train.difflora_fit import MIF_SUFFIX, load_dataset
    from safetensors.torch import load_file

    prep, _, out, _res = built
    names = prep.train_set.identities
    data = load_dataset(out)
    assert sorted(data.names) == names
    for name in names:
        mif = load_file(str(out / f"{name}{MIF_SUFFIX}"))
        samples = _samples(prep, name)
        arc = torch.stack([torch.as_tensor(s["arcface"]).float() for s in samples])
        clip = torch.stack([torch.as_tensor(s["clip_id"]).float() for s in samples])
        want = F.normalize(F.normalize(arc, dim=-1).mean(0), dim=0)
        assert torch.allclose(mif["face"], want, atol=1e-5), name
        assert mif["clip"].shape[-1] == clip.shape[-1] and torch.allclose(mif["clip"][0], clip[:, 0].mean(0), atol=1e-5)


def test_stop_rerun_and_a_changed_config(built, tmp_path, capsys):
    from hyperlora.errors import SettingError
    from hyperlora.train import difflora_dataset as dd

    prep, _, out, _ = built
    names = prep.train_set.identities
    work = tmp_path / "ds"
    shutil.copytree(out, work)
    before = _bytes(work)
    res = _build(prep, work)                                  # all done: nothing is fitted
    assert res.fitted == [] and res.skipped == names
    for name in names[1:3]:                                   # two lost files
        (work / f"{name}.safetensors").unlink()
    res = _build(prep, work, stop=lambda: True)               # as Ctrl-C: stop after the identity being fitted
    assert res.interrupted and res.fitted == [names[1]] and res.skipped == [names[0]]
    assert not (work / f"{names[2]}.safetensors").exists()
    res = _build(prep, work)                                  # the rerun resumes: only the missing one
    assert res.fitted == [names[2]] and res.skipped == [names[0], names[1], names[3]] and not res.interrupted
    assert _bytes(work) == before                             # each identity depends only on itself and the seed
    with pytest.raises(SettingError) as err:
        _build(prep, work, lr=LR / 2, rank=RANK * 2)
    assert "lr: 0.01 in the folder, 0.005 now" in str(err.value) and "rank: 4 in the folder, 8 now" in str(err.value)
    assert "--out" in str(err.value)
    # the CLI says it in one line
    rc = dd.main(["--base-model", str(prep.tree.sdxl), "--shards", str(prep.train_set.folder), "--out", str(work),
                  "--rank", str(RANK), "--steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "0.005"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("difflora-dataset: ")
    assert "(lr: 0.01 in the folder, 0.005 now)" in err          # only lr differs: the CLI's paths are the same
    assert _bytes(work) == before


def test_two_processes_give_the_same_files_as_one(built, tmp_path):
    prep, _, out, _ = built
    names = prep.train_set.identities[:2]                   # one identity per process keeps the test short
    work = tmp_path / "ds"
    proc = run_two(["-m", "hyperlora.train", "difflora-dataset", "--base-model", str(prep.tree.sdxl),
                    "--shards", str(prep.train_set.folder), "--out", str(work), "--rank", str(RANK),
                    "--steps", str(STEPS), "--lr", str(LR), "--batch-size", str(BATCH), "--identities", ",".join(names)],
                   env={"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 of 2" in proc.stdout and "process 2 of 2" in proc.stdout
    assert proc.stdout.count("1 fitted, 0 already done") == 2
    theirs = _bytes(work)
    assert sorted(theirs) == sorted(f"{n}{ext}" for n in names for ext in (".safetensors", ".mif.safetensors"))
    assert theirs == {k: v for k, v in _bytes(out).items() if k in theirs}
    one = json.loads((out / "manifest.json").read_text())
    two = json.loads((work / "manifest.json").read_text())            # both processes' entries, none lost
    assert two["complete"] is False and two["identities"] == {n: one["identities"][n] for n in names}


def test_init_from_starts_at_the_generated_lora(toy, tmp_path):
    from hyperlora.checkpoint import load_hyper_lora
    from hyperlora.lora import DOWN_SUFFIX, UP_SUFFIX
    from hyperlora.lora_file import load_lora_file, read_lora_metadata
    from hyperlora.train import demo
    from hyperlora.train.export import export_folder
    from hyperlora.train.hypernet import TrainableHyperLoRA, unet_modules

    prep, root = toy
    m = demo.toy_fit_config(base_model=prep.tree.sdxl, shards=root, out=root, name="x", stages=(1, 1, 1)).model
    gen = TrainableHyperLoRA.new(unet_modules(prep.unet), rank=m.rank, base_rank=m.base_rank, hyper_dim=m.hyper_dim,
                                 clip_dim=int(prep.train_set[0]["clip_id"].shape[-1]), heads=m.heads, dim=m.dim,
                                 depth=m.depth, dim_head=m.dim_head, ff_mult=m.ff_mult, num_id_tokens=m.num_id_tokens,
                                 seed=5)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():                                  # untrained but not zero: the start is visible
        for group in gen.groups["id"]:
            up, down = getattr(gen, group.up_buffer), getattr(gen, group.down_buffer)
            up.copy_(torch.randn(up.shape, generator=g) * float(down.std()))
    folder = export_folder(gen, tmp_path / "hyper")
    model = load_hyper_lora(folder, dtype=torch.float32)
    name = prep.train_set.identities[0]
    samples = _samples(prep, name)
    tokens = model.id_tokens(id_embeds=torch.stack([torch.as_tensor(s["arcface"]) for s in samples]).float(),
                             clip_features=torch.stack([torch.as_tensor(s["clip_id"]) for s in samples]).float(),
                             use_cache=False)
    generated = model.build_lora(tokens, dtype=torch.float32)

    def delta(lora, prefix):
        d, u = lora[prefix + DOWN_SUFFIX].float(), lora[prefix + UP_SUFFIX].float()
        return float(lora[prefix + ".alpha"]) / d.shape[0] * (u @ d)

    # 0 steps: the file IS the generated LoRA (rank 6 > the model's 4: padded, same weight change)
    res = _build(prep, tmp_path / "zero", init_from=str(folder), steps=0, rank=6, identities=[name])
    assert res.fitted == [name]
    start = load_lora_file(tmp_path / "zero" / f"{name}.safetensors")
    for key in generated:
        if key.endswith(DOWN_SUFFIX):
            p = key[: -len(DOWN_SUFFIX)]
            torch.testing.assert_close(delta(start, p), delta(generated, p), rtol=1e-5, atol=1e-7)
    # a short fit from there lowers the loss below the generated start and below no LoRA
    res = _build(prep, tmp_path / "fit", init_from=str(folder), identities=[name])
    path = tmp_path / "fit" / f"{name}.safetensors"
    meta = read_lora_metadata(path)
    assert meta["difflora_init"] == str(folder)
    entry = json.loads((tmp_path / "fit" / "manifest.json").read_text())["identities"][name]
    assert entry["loss_start"] != entry["loss_none"]
    assert entry["loss"] < entry["loss_start"] and entry["loss"] < entry["loss_none"]
    assert _loss(prep, name, load_lora_file(path)) < _loss(prep, name, generated)


def test_cli_mistakes_give_one_line(toy, tmp_path, capsys):
    from hyperlora.train.__main__ import main as cli
    from hyperlora.train.difflora_dataset import main

    assert cli(["--help"]) == 0 and "difflora-dataset" in capsys.readouterr().out
    prep, _ = toy
    common = ["--base-model", str(prep.tree.sdxl), "--out", str(tmp_path / "o")]
    assert cli(["difflora-dataset"] + common + ["--shards", str(tmp_path / "missing")]) == 2   # through the dispatcher
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shards" in err and "prepare" in err
    assert main(common + ["--shards", str(prep.train_set.folder), "--layers", "attn3.to_q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--layers" in err and "attn1.to_q" in err
    (tmp_path / "file").write_text("x")
    assert main(["--base-model", str(prep.tree.sdxl), "--shards", str(prep.train_set.folder),
                 "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err
    assert main(common + ["--shards", str(prep.train_set.folder), "--init-from", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-from" in err
