"""HyperLoRAModel: tokens and LoRA build against the independent float64 reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hyperlora.checkpoint import load_hyper_lora, read_architecture
from hyperlora.spec import KOHYA_LAYER, LORA_LAYERS
from hyperlora.errors import ImageInputError, LoraError
from hyperlora.generate import batched_matvec, make_groups
from hyperlora.lora import normalize_tokens
from tests.core import ref_hyperlora as ref
from tests.fixtures.hyperlora_models import TINY, write_hyperlora_folder

TOL = 1e-5


def _inputs(n: int, seed: int = 1, clip_len: int = 257) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    e = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1)
    c = torch.randn(n, clip_len, 1024, generator=g)
    return e, c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hyperlora_folder(tmp_path_factory.mktemp("tiny") / "tiny_model", base=True)


@pytest.fixture(scope="module")
def tiny32(tiny: Path):
    return load_hyper_lora(tiny, dtype=torch.float32)


def test_normalize_tokens_rule() -> None:
    t = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = normalize_tokens(t)
    assert torch.allclose(out[0], torch.tensor([0.6, 0.8]), atol=1e-7)
    assert torch.equal(out[1], torch.zeros(2))  # the 1e-8 keeps zero tokens finite
    assert out.dtype == torch.float32


def test_id_tokens_match_reference(tiny: Path, tiny32) -> None:
    e, c = _inputs(1)
    fast = tiny32.id_tokens(id_embeds=e, clip_features=c)
    slow = ref.tokens(tiny, id_embeds=e, clip=c)
    assert fast.shape == (8 * len(TINY.modules), TINY.hyper_dim) and fast.dtype == torch.float32
    assert float((fast.double() - slow).abs().max()) <= TOL
    assert torch.allclose(fast.norm(dim=-1), torch.ones(fast.shape[0]), atol=1e-5)


def test_multi_image_is_mean_of_resampler_outputs(tiny: Path, tiny32) -> None:
    e, c = _inputs(3, seed=2)
    fast = tiny32.id_tokens(id_embeds=e, clip_features=c, chunk=2)  # chunking must not change the mean
    # rule by hand: mean of the raw resampler outputs, then normalise (not mean of normalised tokens)
    with torch.no_grad():
        raw = tiny32.resampler(tiny32.id_projector(e), c)
    by_rule = normalize_tokens(raw.mean(0))
    assert float((fast - by_rule).abs().max()) <= TOL
    assert float((fast - normalize_tokens(normalize_tokens(raw).mean(0))).abs().max()) > 1e-4
    assert float((fast.double() - ref.tokens(tiny, id_embeds=e, clip=c)).abs().max()) <= TOL
    w = [0.5, 0.0, 2.0]
    fw = tiny32.id_tokens(id_embeds=e, clip_features=c, weights=torch.tensor(w))
    assert float((fw.double() - ref.tokens(tiny, id_embeds=e, clip=c, weights=w)).abs().max()) <= TOL
    # weight 0 on an image is the same as leaving it out
    two = tiny32.id_tokens(id_embeds=e[[0, 2]], clip_features=c[[0, 2]], weights=torch.tensor([0.5, 2.0]))
    assert float((fw - two).abs().max()) <= 1e-6


@pytest.mark.parametrize("strategy", ["mv", "bmm", "auto"])
def test_build_lora_matches_reference(tiny: Path, tiny32, strategy: str) -> None:
    e, c = _inputs(2, seed=3)
    toks = tiny32.id_tokens(id_embeds=e, clip_features=c)
    fast = tiny32.build_lora(toks, strategy=strategy)
    slow = ref.lora(tiny, toks)
    assert list(fast) == list(slow)  # same keys, same (JSON) order
    for key, want in slow.items():
        got = fast[key]
        assert got.shape == want.shape and got.dtype == torch.float32, key
        if key.endswith(".alpha"):
            assert float(got) == TINY.rank / 2
        else:
            assert ref.max_rel_diff(got, want) <= TOL, key


def test_lora_keys_shapes_and_json_order(tiny: Path, tiny32) -> None:
    toks = normalize_tokens(torch.randn(8 * len(TINY.modules), TINY.hyper_dim))
    lora = tiny32.build_lora(toks)
    json_names = list(json.loads((tiny / "hyper_lora_modules.json").read_text()))
    assert json_names == [m[0] for m in TINY.modules] and json_names != sorted(json_names)
    assert [m.name for m in tiny32.arch.modules] == json_names
    expected = []
    for name, hidden, cross in TINY.modules:
        for layer in LORA_LAYERS:
            fin = (cross or hidden) if layer in ("to_k", "to_v") else hidden
            p = f"{name}_{KOHYA_LAYER[layer]}"
            expected += [(f"{p}.lora_down.weight", (TINY.rank, fin)), (f"{p}.lora_up.weight", (hidden, TINY.rank)),
                         (f"{p}.alpha", ())]
    assert [(k, tuple(v.shape)) for k, v in lora.items()] == expected
    assert len(lora) == 3 * 4 * len(TINY.modules)


def test_token_mapping_follows_json_not_sorted_order(tiny: Path, tiny32) -> None:
    """Module i owns tokens 8i..8i+7 of the JSON order: a one-hot token lights exactly one matrix."""
    q, k = 8 * len(TINY.modules), TINY.hyper_dim
    # module 1 in JSON order (index 0 after sorting by name), layer to_v, up token = 8*1 + 2*2 + 1
    toks = torch.zeros(q, k)
    toks[8 * 1 + 5, 3] = 1.0
    lora = tiny32.build_lora(toks)
    nonzero = [key for key, v in lora.items() if not key.endswith("alpha") and bool(v.abs().sum() > 0)]
    name = TINY.modules[1][0]
    assert nonzero == [f"{name}_to_v.lora_up.weight"]
    from safetensors import safe_open
    with safe_open(str(tiny / "hyper_lora_modules.safetensors"), "pt") as f:
        basis = f.get_tensor("1.to_v.id_up_basis").float()  # [K, rank, out]
    assert torch.allclose(lora[nonzero[0]], basis[3].T, atol=0)


def test_base_lora_matches_reference(tiny: Path, tiny32) -> None:
    _, c = _inputs(2, seed=4)
    bt = tiny32.base_tokens(c)
    assert float((bt.double() - ref.tokens(tiny, id_embeds=None, clip=c, kind="base")).abs().max()) <= TOL
    fast = tiny32.build_lora(bt, kind="base")
    slow = ref.lora(tiny, bt, kind="base")
    assert list(fast) == list(slow)
    for key, want in slow.items():
        if key.endswith(".alpha"):
            assert float(fast[key]) == TINY.rank // 2 / 2
        else:
            assert fast[key].shape == want.shape and ref.max_rel_diff(fast[key], want) <= TOL, key
    assert fast[next(iter(fast))].shape[0] == TINY.rank // 2


@pytest.mark.parametrize("mode", ["id", "clip"])
def test_one_condition_models(tmp_path: Path, mode: str) -> None:
    folder = write_hyperlora_folder(tmp_path / f"one_{mode}", one_condition=mode, seed=5)
    arch = read_architecture(folder)
    assert len(arch.resampler.embed_dims) == 1
    assert (arch.id_embed_dim is None) == (mode == "clip")
    model = load_hyper_lora(folder, dtype=torch.float32)
    e, c = _inputs(2, seed=6)
    fast = model.id_tokens(id_embeds=e if mode == "id" else None, clip_features=c if mode == "clip" else None)
    slow = ref.tokens(folder, id_embeds=e, clip=c)
    assert float((fast.double() - slow).abs().max()) <= TOL


def test_fp16_model_builds_close_to_reference(tiny: Path) -> None:
    m16 = load_hyper_lora(tiny)  # file dtype
    assert m16.basis_dtype == torch.float16 and m16.module_dtype == torch.float16
    e, c = _inputs(1, seed=7)
    toks = m16.id_tokens(id_embeds=e, clip_features=c)
    assert toks.dtype == torch.float32 and bool(torch.isfinite(toks).all())
    assert float((toks.double() - ref.tokens(tiny, id_embeds=e, clip=c)).abs().max()) < 2e-2
    lora = m16.build_lora(toks)
    lora32 = m16.build_lora(toks, dtype=torch.float32)
    slow = ref.lora(tiny, toks)
    for key, want in slow.items():
        assert lora[key].dtype == torch.float16 and lora32[key].dtype == torch.float32
        if not key.endswith("alpha"):
            assert ref.max_rel_diff(lora[key], want) < 5e-3, key


def test_batched_matvec_strategies_agree() -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(5, 7, 3, generator=g)
    coeffs = torch.randn(5, 3, generator=g)
    want = torch.stack([basis[m] @ coeffs[m] for m in range(5)])
    for s in ("mv", "bmm", "auto"):
        assert torch.allclose(batched_matvec(basis, coeffs, strategy=s), want, atol=1e-6)
    with pytest.raises(ValueError, match="unknown strategy"):
        batched_matvec(basis, coeffs, strategy="loop")


def test_threaded_matvec_is_bit_identical_to_one_thread() -> None:
    """The CPU kernel spreads matrices over threads; each row is still one torch.mv call."""
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(9, 64, 16, generator=g).half()
    coeffs = torch.randn(9, 16, generator=g).half()
    one = batched_matvec(basis, coeffs, strategy="mv", workers=1)
    for n in (2, 3, 8):
        assert torch.equal(batched_matvec(basis, coeffs, strategy="mv", workers=n), one)
    want = torch.stack([torch.mv(basis[m], coeffs[m]) for m in range(9)])
    assert torch.equal(one, want)


def test_groups_cover_every_matrix_once(tiny: Path) -> None:
    arch = read_architecture(tiny)
    groups = make_groups(arch, "id")
    entries = [e for g in groups for e in g.entries]
    assert sorted(entries) == sorted((i, L) for i in range(len(arch.modules)) for L in LORA_LAYERS)
    assert len({(g.in_features, g.out_features) for g in groups}) == len(groups) == 4


def test_input_errors(tiny32) -> None:
    e, c = _inputs(2)
    with pytest.raises(ImageInputError, match="ArcFace"):
        tiny32.id_tokens(id_embeds=None, clip_features=c)
    with pytest.raises(ImageInputError, match="CLIP"):
        tiny32.id_tokens(id_embeds=e, clip_features=None)
    with pytest.raises(ImageInputError, match=r"clip_features must have shape \[N, 257, 1024\]"):
        tiny32.id_tokens(id_embeds=e, clip_features=torch.randn(2, 257, 768))
    with pytest.raises(ImageInputError, match="2 face embeddings but 1 CLIP"):
        tiny32.id_tokens(id_embeds=e, clip_features=c[:1])
    with pytest.raises(ImageInputError, match="weights"):
        tiny32.id_tokens(id_embeds=e, clip_features=c, weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(LoraError, match=r"needs \[40, 6\]"):
        tiny32.build_lora(torch.zeros(48, 6))
    with pytest.raises(LoraError, match="kind"):
        tiny32.build_lora(torch.zeros(40, 6), kind="style")


def test_no_base_model_refuses_base_kind(tmp_path: Path) -> None:
    model = load_hyper_lora(write_hyperlora_folder(tmp_path / "nobase"), dtype=torch.float32)
    with pytest.raises(LoraError, match="no Base-LoRA"):
        model.base_tokens(torch.randn(1, 257, 1024))
    with pytest.raises(LoraError, match="no Base-LoRA"):
        model.build_lora(torch.zeros(40, 6), kind="base")


def test_outputs_are_plain_tensors_and_dtypes_follow_load(tiny: Path) -> None:
    model = load_hyper_lora(tiny, dtype=torch.bfloat16)
    assert model.basis_dtype == torch.bfloat16 and model.module_dtype == torch.bfloat16
    e, c = _inputs(1, seed=8)
    toks = model.id_tokens(id_embeds=e, clip_features=c)
    lora = model.build_lora(toks, dtype=torch.float32)
    assert not toks.is_inference() and toks.dtype == torch.float32
    key = next(iter(lora))
    lora[key].add_(0.0)  # usable outside inference mode (e.g. as the start of a fine-tune)
    slow = ref.lora(tiny, toks)
    assert all(ref.max_rel_diff(lora[k], slow[k]) < 3e-2 for k in slow if not k.endswith("alpha"))


def test_resampler_dtype_override(tiny: Path) -> None:
    model = load_hyper_lora(tiny, resampler_dtype=torch.float32)
    assert model.basis_dtype == torch.float16 and model.module_dtype == torch.float32
    assert model.id_projector is not None and model.id_projector.state_dict()["0.weight"].dtype == torch.float32
    e, c = _inputs(1, seed=9)
    toks = model.id_tokens(id_embeds=e, clip_features=c)
    # fp32 math on the fp16 file weights: as exact as the fp32 model
    assert float((toks.double() - ref.tokens(tiny, id_embeds=e, clip=c)).abs().max()) <= 1e-5
    lora = model.build_lora(toks)
    assert all(v.dtype == torch.float16 for v in lora.values())
