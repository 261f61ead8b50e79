"""checkpoint.py: architecture from headers, fingerprint, strict validation messages."""

from __future__ import annotations

import builtins
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperlora.checkpoint import is_model_folder, load_hyper_lora, model_fingerprint, read_architecture
from hyperlora.spec import DEFAULT_HEADS, RESAMPLER_HEADS_META
from hyperlora.errors import ModelFileError
from tests.fixtures.hyperlora_models import TINY, write_hyperlora_folder


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return write_hyperlora_folder(tmp_path / "sdxl_tiny", base=True)


def _edit(path: Path, fn) -> None:
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def _raises(folder: Path, *fragments: str, load: bool = False, **kw) -> str:
    with pytest.raises(ModelFileError) as info:
        (load_hyper_lora if load else read_architecture)(folder, **kw)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in: {msg}"
    return msg


def test_tiny_architecture(tiny: Path) -> None:
    arch = read_architecture(tiny)
    assert [(m.name, m.hidden_size, m.cross_attention_dim) for m in arch.modules] == list(TINY.modules)
    assert (arch.hyper_dim, arch.rank, arch.base_rank) == (6, 4, 2)
    assert (arch.id_embed_dim, arch.num_id_tokens) == (512, 4)
    r = arch.resampler
    assert (r.dim, r.depth, r.heads, r.dim_head, r.ff_mult, r.num_queries, r.output_dim, r.embed_dims) == \
        (32, 2, DEFAULT_HEADS, 4, 2, 40, 6, (48, 1024))
    assert arch.base_resampler is not None and arch.base_resampler.embed_dims == (1024,)
    assert arch.num_tokens == 40
    m0 = arch.modules[0]
    assert (m0.in_features("to_k"), m0.in_features("to_q"), m0.out_features("to_v")) == (40, 24, 24)
    assert is_model_folder(tiny) and not is_model_folder(tiny.parent)
    assert read_architecture(tiny, heads=6).resampler.dim_head == 8


class _CountingFile(io.FileIO):
    """A binary file that adds what it reads to a shared counter."""

    counter: list[int]

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.counter[0] += len(data)
        return data

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = super().readinto(buffer)
        self.counter[0] += n or 0
        return n


@pytest.fixture()
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the bytes the code under test reads through ``open(path, "rb")`` (deterministic, unlike a timer)."""
    counter = [0]
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        if mode == "rb" and not args and not kwargs:
            f = _CountingFile(file, "r")
            f.counter = counter
            return f
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return counter


def test_full_architecture_from_headers(tmp_path: Path, bytes_read: list[int]) -> None:
    folder = write_hyperlora_folder(tmp_path / "full", preset="full", sparse=True)
    bytes_read[0] = 0
    arch = read_architecture(folder)
    assert 0 < bytes_read[0] < 1_000_000   # headers only, not the 3 GB of data
    assert len(arch.modules) == 140 and arch.hyper_dim == 128 and arch.rank == 8 and arch.base_rank is None
    r = arch.resampler
    assert (r.dim, r.depth, r.heads, r.dim_head, r.ff_mult, r.num_queries, r.embed_dims) == \
        (1024, 4, 12, 64, 4, 1120, (1024, 1024))
    assert (arch.id_embed_dim, arch.num_id_tokens) == (512, 16)
    assert sum(m.cross_attention_dim == 2048 for m in arch.modules) == 70
    assert sorted({m.hidden_size for m in arch.modules}) == [640, 1280]
    lora_numbers = sum(arch.rank * (m.in_features(layer) + m.out_features(layer))
                       for m in arch.modules for layer in ("to_q", "to_k", "to_v", "to_out"))
    assert lora_numbers == 11_612_160  # format §4: ~11.6 million values in the generated LoRA


def test_fingerprint_is_cheap_and_content_sensitive(tiny: Path, tmp_path: Path, bytes_read: list[int]) -> None:
    fp = model_fingerprint(tiny)
    assert len(fp) == 16 and int(fp, 16) >= 0
    copy = tmp_path / "renamed"
    shutil.copytree(tiny, copy)
    assert model_fingerprint(copy) == fp  # folder name is not content
    data = bytearray((copy / "hyper_lora_modules.safetensors").read_bytes())
    data[-1] ^= 0x01  # the last bytes of the data are always sampled
    (copy / "hyper_lora_modules.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(copy) != fp
    other = write_hyperlora_folder(tmp_path / "other", base=True, seed=9)
    assert model_fingerprint(other) != fp
    big = write_hyperlora_folder(tmp_path / "full", preset="full", sparse=True)
    size = sum(p.stat().st_size for p in big.iterdir())
    bytes_read[0] = 0
    model_fingerprint(big)
    assert size > 2_000_000_000 and 0 < bytes_read[0] < 1_500_000   # samples, not the whole 3 GB


# ----------------------------------------------------------------------------- folder-level errors


def test_missing_folder(tmp_path: Path) -> None:
    _raises(tmp_path / "nope", "does not exist", "download")


def test_missing_file(tiny: Path) -> None:
    (tiny / "resampler.safetensors").unlink()
    _raises(tiny, "has no 'resampler.safetensors'", str(tiny))


def test_missing_id_projector_for_two_conditions(tiny: Path) -> None:
    (tiny / "id_projector.safetensors").unlink()
    _raises(tiny, "id_projector.safetensors", "two conditions")


def test_plain_lora_file_chosen(tmp_path: Path) -> None:
    lora = tmp_path / "my_face.safetensors"
    save_file({"lora_unet_x_to_q.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    _raises(lora, "plain LoRA", "LoraLoader")
    _raises(tmp_path, "plain LoRA files (my_face.safetensors)", "LoraLoader")


def test_parent_folder_chosen(tiny: Path) -> None:
    _raises(tiny.parent, "choose one of sdxl_tiny")


def test_empty_folder(tmp_path: Path) -> None:
    _raises(tmp_path, "has no hyper_lora_modules.json")


def test_pickle_instead_of_safetensors(tiny: Path) -> None:
    (tiny / "resampler.safetensors").unlink()
    torch.save({"latents": torch.zeros(1)}, tiny / "resampler.bin")
    _raises(tiny, "resampler.bin' is a pickle file", "never unpickles")


def test_not_a_safetensors_file(tiny: Path) -> None:
    torch.save({"latents": torch.zeros(1)}, tiny / "resampler.safetensors")  # a pickle under the right name
    _raises(tiny, "resampler.safetensors' is not a valid safetensors file", "download the file again")
    (tiny / "resampler.safetensors").write_text("<html>404 Not Found</html>")
    _raises(tiny, "not a valid safetensors file")


def test_truncated_file(tiny: Path) -> None:
    path = tiny / "hyper_lora_modules.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    _raises(tiny, "is truncated", "download the file again")


def test_bad_json(tiny: Path) -> None:
    (tiny / "hyper_lora_modules.json").write_text("{not json")
    _raises(tiny, "hyper_lora_modules.json' is not valid JSON")
    (tiny / "hyper_lora_modules.json").write_text(json.dumps({"m": {"hidden_size": "big"}}))
    _raises(tiny, "entry 'm'", "hidden_size")


# ----------------------------------------------------------------------------- key / shape errors


def test_missing_basis_key(tiny: Path) -> None:
    _edit(tiny / "hyper_lora_modules.safetensors", lambda sd: sd.pop("3.to_v.id_up_basis"))
    _raises(tiny, "hyper_lora_modules.safetensors' lacks 1 tensor(s)", "'3.to_v.id_up_basis'")


def test_unexpected_resampler_key(tiny: Path) -> None:
    _edit(tiny / "resampler.safetensors", lambda sd: sd.update({"layers.0.attn1.to_q.bias": torch.zeros(48)}))
    _raises(tiny, "resampler.safetensors' has 1 unexpected tensor(s)", "'layers.0.attn1.to_q.bias'")


def test_missing_resampler_layer_key(tiny: Path) -> None:
    _edit(tiny / "resampler.safetensors", lambda sd: sd.pop("layers.1.norm_attn3_y.bias"))
    _raises(tiny, "lacks 1 tensor(s)", "'layers.1.norm_attn3_y.bias'")


def test_json_vs_tensor_shape_mismatch(tiny: Path) -> None:
    path = tiny / "hyper_lora_modules.json"
    modules = json.loads(path.read_text())
    name = TINY.modules[0][0]
    modules[name]["cross_attention_dim"] = 64
    path.write_text(json.dumps(modules))
    msg = _raises(tiny, "tensor '0.to_k.id_down_basis' has shape [6, 40, 4] but [6, 64, 4] was expected",
                  "hyper_lora_modules.safetensors", "same model")
    assert str(tiny / "hyper_lora_modules.safetensors") in msg


def test_json_module_count_mismatch(tiny: Path) -> None:
    path = tiny / "hyper_lora_modules.json"
    modules = json.loads(path.read_text())
    modules.pop(TINY.modules[-1][0])
    path.write_text(json.dumps(modules))
    _raises(tiny, "lists 4 modules", "holds a basis for 5")


def test_token_count_mismatch(tiny: Path) -> None:
    _edit(tiny / "resampler.safetensors", lambda sd: sd.update({"latents": torch.zeros(1, 48, 32, dtype=torch.float16)}))
    _raises(tiny, "tensor 'latents' has shape [1, 48, 32] but [1, 40, 32] was expected", "8 tokens for each of the 5")


def test_hyper_dim_mismatch(tiny: Path) -> None:
    def fn(sd):
        sd["proj_out.weight"] = torch.zeros(7, 32, dtype=torch.float16)
        sd["proj_out.bias"] = torch.zeros(7, dtype=torch.float16)
    _edit(tiny / "resampler.safetensors", fn)
    _raises(tiny, "'proj_out.weight' has shape [7, 32] but [6, 32] was expected", "K=6")


def test_id_projector_width_mismatch(tiny: Path) -> None:
    _edit(tiny / "id_projector.safetensors", lambda sd: sd.update({"2.weight": torch.ones(50, dtype=torch.float16)}))
    _raises(tiny, "id_projector.safetensors': tensor '2.weight' has shape [50] but [48] was expected")


def test_heads_not_dividing(tiny: Path) -> None:
    _raises(tiny, "cannot be split into 5 heads (as requested)", "damaged", heads=5)


def _set_heads_metadata(folder: Path, value: str) -> None:
    for name in ("resampler.safetensors", "base_resampler.safetensors"):
        sd = load_file(str(folder / name))
        save_file(sd, str(folder / name), metadata={"format": "pt", RESAMPLER_HEADS_META: value})


def test_heads_from_metadata(tiny: Path) -> None:
    """Models trained by this pack record their heads; released files (no metadata) keep 12."""
    width = read_architecture(tiny).resampler.heads * read_architecture(tiny).resampler.dim_head
    assert read_architecture(tiny).resampler.heads == DEFAULT_HEADS
    _set_heads_metadata(tiny, "4")
    arch = read_architecture(tiny)
    assert (arch.resampler.heads, arch.resampler.dim_head) == (4, width // 4)
    assert arch.base_resampler is not None and arch.base_resampler.heads == 4
    assert read_architecture(tiny, heads=6).resampler.heads == 6          # an explicit value still wins
    _set_heads_metadata(tiny, "5")
    _raises(tiny, "cannot be split into 5 heads (from the file's metadata 'hyperlora_resampler_heads')")
    _set_heads_metadata(tiny, "twelve")
    _raises(tiny, "'hyperlora_resampler_heads' is 'twelve', not a whole number")


def test_base_basis_without_base_resampler(tiny: Path) -> None:
    (tiny / "base_resampler.safetensors").unlink()
    _raises(tiny, "has no 'base_resampler.safetensors' although", "Base-LoRA basis")


def test_base_resampler_without_base_basis(tmp_path: Path) -> None:
    folder = write_hyperlora_folder(tmp_path / "nobase")
    other = write_hyperlora_folder(tmp_path / "withbase", base=True)
    shutil.copy(other / "base_resampler.safetensors", folder)
    _raises(folder, "holds no base basis", "Remove 'base_resampler.safetensors'")


def test_non_float_dtype(tiny: Path) -> None:
    _edit(tiny / "id_projector.safetensors", lambda sd: sd.update({"2.bias": torch.zeros(48, dtype=torch.int64)}))
    _raises(tiny, "tensor '2.bias' has dtype I64", "floating point")


@pytest.mark.parametrize("filename,key", [("hyper_lora_modules.safetensors", "2.to_out.id_down_basis"),
                                          ("resampler.safetensors", "layers.1.ff.net.2.weight"),
                                          ("id_projector.safetensors", "0.bias"),
                                          ("base_resampler.safetensors", "latents")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weights_rejected_at_load(tiny: Path, filename: str, key: str, bad: float) -> None:
    def fn(sd):
        t = sd[key].clone()
        t.view(-1)[t.numel() // 2] = bad
        sd[key] = t
    _edit(tiny / filename, fn)
    read_architecture(tiny)  # headers are fine
    _raises(tiny, f"{filename}': tensor '{key}' contains 1 NaN/inf", "Download the model again", load=True)


def test_load_is_strict_and_in_requested_dtype(tiny: Path) -> None:
    m = load_hyper_lora(tiny, dtype=torch.float32)
    assert m.module_dtype == torch.float32 and m.basis_dtype == torch.float32
    assert all(not p.requires_grad and p.device.type == "cpu" for p in m.parameters())
    sd = load_file(str(tiny / "resampler.safetensors"))
    for k, v in sd.items():
        assert torch.equal(m.resampler.state_dict()[k], v.float()), k
    assert m.name == "sdxl_tiny" and m.fingerprint == model_fingerprint(tiny)
    basis = load_file(str(tiny / "hyper_lora_modules.safetensors"))
    for g, down, up in m.basis_groups("id"):  # buffers hold the transposed basis, exact
        for j, (i, layer) in enumerate(g.entries):
            assert torch.equal(down[j], basis[f"{i}.{layer}.id_down_basis"].float().reshape(6, -1).T)
            assert torch.equal(up[j], basis[f"{i}.{layer}.id_up_basis"].float().reshape(6, -1).T)


def test_loading_checks_for_an_interrupt_between_basis_matrices(tmp_path):
    folder = write_hyperlora_folder(tmp_path / "tiny_model", base=True)

    class Stop(Exception):
        pass

    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        load_hyper_lora(folder, check_interrupt=check)
    counted: list[int] = []
    model = load_hyper_lora(folder, check_interrupt=lambda: counted.append(1))
    assert len(counted) == sum(len(g.entries) for kind in ("id", "base") for g, _, _ in model.basis_groups(kind))
