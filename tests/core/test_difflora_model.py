"""DiffLoraModel: a tiny DiffLoRA trained on a synthetic LoRA family (tests/fixtures/difflora_synth.py), saved as a
model folder, loaded from it and sampled.  One training (~10 s on one busy core) serves the whole module; the same
pipeline through ``difflora-fit`` / ``difflora-export`` is tested in tests/train/test_difflora_fit.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperlora.difflora.dit import LatentDiT
from hyperlora.difflora.model import GENERATOR_NAME, DiffLoraModel, folder_fingerprint
from hyperlora.errors import ImageInputError, ModelFileError, SettingError
from hyperlora.lora import GeneratedLora
from tests.fixtures.difflora_synth import (
    HELD_OUT_Z,
    TRAIN_Z,
    held_out_retrieval,
    lora_of,
    mif_of,
    rel,
    train_tiny,
)

NEW_PERSON_MIN = 0.2
"""An unconditional sample's smallest distance to any training LoRA (measured: >= 0.34; a copy of a training
LoRA through the LAE would be ~0.1 away)."""
STEPS = 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():                                         # type: ignore[no-untyped-def]
    """Tiny models: one intra-op thread is several times faster than two on a busy machine (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("difflora") / "model")


@pytest.fixture(scope="module")
def model(trained: Path) -> DiffLoraModel:
    return DiffLoraModel.from_folder(trained)


def test_loaded_model_is_eval_with_folder_provenance(model: DiffLoraModel, trained: Path) -> None:
    assert not model.lae.training and not model.dit.training
    assert all(not p.requires_grad for p in model.dit.parameters())
    assert model.name == trained.name and model.fingerprint == folder_fingerprint(trained)
    assert len(model.fingerprint) == 16
    lora = model.loras_from_mif(mif_of(HELD_OUT_Z[0]), seeds=[7], steps=3, guidance=2.5)[0]
    assert isinstance(lora, GeneratedLora)
    assert lora.provenance == {"model_name": trained.name, "model_fingerprint": model.fingerprint,
                               "generator": GENERATOR_NAME, "how": "DiffLoRA sample for the reference photos",
                               "seed": "7", "steps": "3", "guidance": "2.5"}
    assert set(lora) == set(lora_of(HELD_OUT_Z[0]))          # the dataset's kohya keys
    for k, v in lora.items():
        assert v.shape == lora_of(HELD_OUT_Z[0])[k].shape and v.dtype == torch.float32 and v.device.type == "cpu"


def test_samples_for_held_out_people_are_their_own_lora_and_untrained_dit_is_not(model: DiffLoraModel) -> None:
    hits, total, dists = held_out_retrieval(model, [0, 1], STEPS)
    assert hits == total == 12, dists
    # control: the same LAE with an untrained DiT (same config) must fail the same assertion
    fresh = LatentDiT(model.dit.config, model.dit.mif_spec)
    control = DiffLoraModel(model.lae, fresh, model.latent_scale, name="untrained")
    c_hits, c_total, c_dists = held_out_retrieval(control, [0, 1], STEPS)
    assert c_hits < c_total // 2, c_dists


def test_seeds_differ_but_keep_the_identity_and_repeat_exactly(model: DiffLoraModel) -> None:
    z = HELD_OUT_Z[2]
    a, b = model.loras_from_mif(mif_of(z), seeds=[10, 11], steps=STEPS)
    assert rel(a, b) > 0.01                                   # different samples...
    own = lora_of(z)
    others = [lora_of(o) for j, o in enumerate(HELD_OUT_Z) if j != 2]
    for s in (a, b):                                          # ...of the same person
        assert rel(s, own) < min(rel(s, o) for o in others)
    again = model.loras_from_mif(mif_of(z), seeds=[10, 11], steps=STEPS)
    assert all(torch.equal(again[1][k], b[k]) for k in b)     # a seed gives the same LoRA every time
    alone = model.loras_from_mif(mif_of(z), seeds=[11], steps=STEPS)[0]
    assert rel(alone, b) < 1e-4                               # and does not depend on the batch (up to rounding)


def test_new_person_is_no_training_lora(model: DiffLoraModel) -> None:
    steps_seen: list[tuple[int, int]] = []
    people = model.new_person([0, 1, 2, 3], STEPS, callback=lambda d, n: steps_seen.append((d, n)))
    assert steps_seen[-1] == (STEPS, STEPS) and len(steps_seen) == STEPS
    train = [lora_of(z) for z in TRAIN_Z]
    for p in people:
        assert p.provenance["generator"] == GENERATOR_NAME and "guidance" not in p.provenance
        assert min(rel(p, t) for t in train) > NEW_PERSON_MIN
    assert min(rel(people[i], people[j]) for i in range(4) for j in range(i + 1, 4)) > 0.05


def test_latent_scale_is_undone_before_decoding(model: DiffLoraModel) -> None:
    lora = lora_of(TRAIN_Z[3])
    z = model.lae.encode([lora])
    back = model._decode(z / model.latent_scale)[0]
    assert rel(back, lora) < 0.2
    wrong = DiffLoraModel(model.lae, model.dit, 1.0)._decode(z / model.latent_scale)[0]
    assert rel(wrong, lora) > rel(back, lora) + 0.05          # the scale matters (it is 0.5 to 1 here)


def test_interrupt_and_bad_inputs(model: DiffLoraModel) -> None:
    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        model.loras_from_mif(mif_of(HELD_OUT_Z[0]), seeds=[0], steps=5, check_interrupt=stop)
    with pytest.raises(SettingError, match="seeds"):
        model.loras_from_mif(mif_of(HELD_OUT_Z[0]), seeds=3, steps=5)          # type: ignore[arg-type]
    with pytest.raises(SettingError, match="seed -1"):
        model.new_person([-1], 5)
    with pytest.raises(SettingError, match="steps"):
        model.new_person([0], 0)
    m = mif_of(HELD_OUT_Z[0])
    m.face = m.face[None]
    with pytest.raises(ImageInputError, match="one person's MIF"):
        model.loras_from_mif(m, seeds=[0], steps=5)


def test_bfloat16_load_samples_close_to_float32(model: DiffLoraModel, trained: Path) -> None:
    half = DiffLoraModel.from_folder(trained, dtype=torch.bfloat16)
    assert half.dit.x_in.weight.dtype == torch.bfloat16
    a = model.loras_from_mif(mif_of(HELD_OUT_Z[1]), seeds=[0], steps=STEPS)[0]
    b = half.loras_from_mif(mif_of(HELD_OUT_Z[1]), seeds=[0], steps=STEPS)[0]
    assert b["lora_unet_a.lora_up.weight"].dtype == torch.float32
    assert rel(b, a) < 0.15
    with pytest.raises(SettingError, match="dtype"):
        DiffLoraModel.from_folder(trained, dtype=torch.int8)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _rewrite_dit(folder: Path, change) -> None:          # type: ignore[no-untyped-def]
    from hyperlora.safetensors_io import read_header

    path = folder / "dit.safetensors"
    meta = read_header(path).metadata
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata=meta)


@pytest.mark.parametrize("case", ["missing", "extra", "shape", "config"])
def test_strict_load_refuses_a_mismatched_dit(trained: Path, tmp_path: Path, case: str) -> None:
    folder = _copy(trained, tmp_path / "bad")
    if case == "missing":
        _rewrite_dit(folder, lambda s: s.pop("x_out.weight"))
        match = r"dit\.safetensors' lacks 'x_out\.weight'"
    elif case == "extra":
        _rewrite_dit(folder, lambda s: s.__setitem__("stray.weight", torch.zeros(2)))
        match = r"dit\.safetensors' has 'stray\.weight', which the DiT does not know"
    elif case == "shape":
        _rewrite_dit(folder, lambda s: s.__setitem__("pos", torch.zeros(1, 1)))
        match = r"tensor 'pos' is \[1, 1\]"
    else:
        data = json.loads((folder / "difflora.json").read_text())
        data["condition"]["width"] = 64                      # no longer the DiT's cond_dim
        (folder / "difflora.json").write_text(json.dumps(data))
        match = r"difflora\.json'.*cond_dim"
    with pytest.raises(ModelFileError, match=match) as err:
        DiffLoraModel.from_folder(folder)
    assert "difflora-export" in str(err.value)                # the fix is named
