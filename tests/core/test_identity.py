"""Identity files (hyperlora/identity.py): round trip, refusals, fitting the model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hyperlora.errors import IdentityFileError, LoraError
from hyperlora.spec import IDENTITY_FORMAT
from hyperlora.identity import (
    Identity,
    check_identity_fits,
    load_identity,
    mean_face_embedding,
    mix_identities,
    save_identity,
)
from hyperlora.lora import mix_tokens
from hyperlora.lora_file import save_lora_file
from tests.fixtures.hyperlora_models import TINY
from tests.fixtures.loras import random_lora, random_tokens

SETTINGS = {"face_choice": "largest", "remove_background": "true", "det_size": "640"}


def make_identity(q: int = 40, k: int = 6, *, seed: int = 0, base_q: int | None = None, **kw) -> Identity:
    fields = dict(model_name="tiny_model", model_fingerprint="f" * 64, num_images=3, settings=dict(SETTINGS))
    fields.update(kw)
    base = random_tokens(base_q, k, seed=seed + 100) if base_q else None
    return Identity(tokens=random_tokens(q, k, seed=seed), base_tokens=base, **fields)


def write_raw(path, tensors, **meta) -> None:
    """An identity-like file written directly (to make the damaged files save_identity refuses to write)."""
    full = {"format": IDENTITY_FORMAT, "format_version": "1", "model_name": "m", "model_fingerprint": "x",
            "num_queries": "8", "hyper_dim": "6", "num_images": "1", "settings": "{}"}
    full.update(meta)
    save_file(tensors, str(path), metadata=full)


# ----------------------------------------------------------------- files


@pytest.mark.parametrize("base_q", [None, 24])
def test_round_trip_is_bit_exact(tmp_path, base_q):
    ident = make_identity(base_q=base_q)
    path = tmp_path / "sub" / "anna.safetensors"  # the folder is created
    save_identity(ident, path)
    back = load_identity(path)
    assert back.tokens.dtype == torch.float32 and torch.equal(back.tokens, ident.tokens)
    if base_q is None:
        assert back.base_tokens is None
    else:
        assert torch.equal(back.base_tokens, ident.base_tokens)
    assert (back.model_name, back.model_fingerprint, back.num_images) == ("tiny_model", "f" * 64, 3)
    assert back.settings == SETTINGS
    assert [p.name for p in path.parent.iterdir()] == ["anna.safetensors"]


def test_metadata_fields(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "id.safetensors"
    save_identity(make_identity(), path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["tokens"]
    assert meta["format"] == "hyperlora.identity" and meta["format_version"] == "2"
    assert (meta["num_queries"], meta["hyper_dim"], meta["num_images"]) == ("40", "6", "3")
    assert json.loads(meta["settings"]) == SETTINGS
    assert meta["model_name"] == "tiny_model" and meta["model_fingerprint"] == "f" * 64


def test_released_size_identity_is_about_0_57_mb(tmp_path):
    """Q = 1120 tokens x K = 128 coefficients in float32 (format §2, §4): 573,440 bytes of data."""
    ident = make_identity(1120, 128)
    path = tmp_path / "released.safetensors"
    save_identity(ident, path)
    size = path.stat().st_size
    assert 573_440 < size < 575_000, size
    assert torch.equal(load_identity(path).tokens, ident.tokens)


def test_save_converts_to_float32_and_refuses_bad_identities(tmp_path):
    ident = make_identity()
    half = Identity(ident.tokens.half(), None, "m", "x", 1, {})
    save_identity(half, tmp_path / "half.safetensors")
    assert torch.equal(load_identity(tmp_path / "half.safetensors").tokens, ident.tokens.half().float())
    with pytest.raises(IdentityFileError, match=r"'.*id\.pt' has another extension"):
        save_identity(ident, tmp_path / "id.pt")
    nan = Identity(torch.full((8, 6), float("nan")), None, "m", "x", 1, {})
    with pytest.raises(IdentityFileError, match="Cannot save the identity to .*NaN"):
        save_identity(nan, tmp_path / "nan.safetensors")
    flat = Identity(torch.ones(6), None, "m", "x", 1, {})
    with pytest.raises(IdentityFileError, match=r"2-D float matrix \[Q, K\], got \[6\]"):
        save_identity(flat, tmp_path / "flat.safetensors")
    odd_base = Identity(ident.tokens, torch.ones(4, 5) / 5 ** 0.5, "m", "x", 1, {})
    with pytest.raises(IdentityFileError, match="different sizes K"):
        save_identity(odd_base, tmp_path / "odd.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.safetensors"]


def test_load_errors(tmp_path):
    with pytest.raises(IdentityFileError, match="identity file '.*nope.safetensors' does not exist"):
        load_identity(tmp_path / "nope.safetensors")

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(IdentityFileError, match="not a readable .safetensors identity file .*; it is damaged .*"
                                                "Pick another file, or make the identity again from the photos"):
        load_identity(junk)
    cut = tmp_path / "cut.safetensors"            # an interrupted copy of a good file
    good = Identity(tokens=torch.nn.functional.normalize(torch.randn(40, 6), dim=-1), base_tokens=None,
                    model_name="m", model_fingerprint="f" * 16, num_images=1, settings={})
    save_identity(good, tmp_path / "good.safetensors")
    cut.write_bytes((tmp_path / "good.safetensors").read_bytes()[:-100])
    with pytest.raises(IdentityFileError, match="Save Identity node"):
        load_identity(cut)

    pickled = tmp_path / "id.pt"
    torch.save({"tokens": torch.zeros(2, 2)}, pickled)
    with pytest.raises(IdentityFileError, match="pickled PyTorch file.*never unpickles"):
        load_identity(pickled)

    lora = tmp_path / "lora.safetensors"
    save_lora_file(random_lora(TINY.modules[:1], rank=2), lora)
    with pytest.raises(IdentityFileError, match="not a HyperLoRA identity file \\(it looks like a LoRA\\)"):
        load_identity(lora)

    no_tokens = tmp_path / "no_tokens.safetensors"
    write_raw(no_tokens, {"other": torch.zeros(8, 6)})
    with pytest.raises(IdentityFileError, match="damaged: it has no 'tokens' tensor"):
        load_identity(no_tokens)

    nan = tmp_path / "nan.safetensors"
    write_raw(nan, {"tokens": torch.full((8, 6), float("nan"))})
    with pytest.raises(IdentityFileError, match="damaged: its tokens contain NaN"):
        load_identity(nan)

    shape = tmp_path / "shape.safetensors"
    write_raw(shape, {"tokens": random_tokens(8, 6)}, num_queries="16")
    with pytest.raises(IdentityFileError, match=r"tokens are \[8, 6\] but its metadata says \[16, 6\]"):
        load_identity(shape)

    newer = tmp_path / "newer.safetensors"
    write_raw(newer, {"tokens": torch.zeros(8, 6)}, format_version="3")
    with pytest.raises(IdentityFileError, match="newer HyperLoRA Studio .*update HyperLoRA Studio"):
        load_identity(newer)


# ----------------------------------------------------------------- face embedding (format version 2)


def unit(seed: int, n: int = 1) -> torch.Tensor:
    e = torch.randn(n, 512, generator=torch.Generator().manual_seed(seed))
    return e / e.norm(dim=1, keepdim=True)


def test_face_embedding_round_trip_and_version_1_files(tmp_path):
    emb = unit(3)[0]
    ident = make_identity(face_embedding=emb)
    save_identity(ident, tmp_path / "v2.safetensors")
    back = load_identity(tmp_path / "v2.safetensors")
    assert back.face_embedding.dtype == torch.float32 and torch.equal(back.face_embedding, emb)
    assert torch.equal(back.tokens, ident.tokens)
    # everything else is as in version 1: the same tensors and metadata apart from the version
    save_identity(make_identity(), tmp_path / "plain.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "v2.safetensors"), "pt") as f2, safe_open(str(tmp_path / "plain.safetensors"), "pt") as f1:
        assert sorted(f2.keys()) == ["face_embedding", "tokens"] and sorted(f1.keys()) == ["tokens"]
        assert f2.metadata() == f1.metadata()
    # a version 1 file (written before embeddings were recorded) loads, without an embedding
    old = tmp_path / "v1.safetensors"
    write_raw(old, {"tokens": ident.tokens[:8].contiguous()}, format_version="1")
    v1 = load_identity(old)
    assert v1.face_embedding is None and torch.equal(v1.tokens, ident.tokens[:8])


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(512), "zero or not finite"),
    (torch.full((512,), float("nan")), "zero or not finite"),
    (torch.ones(256), r"float vector \[512\], got \[256\]"),
])
def test_bad_face_embeddings_are_refused(tmp_path, bad, match):
    with pytest.raises(IdentityFileError, match="Cannot save the identity.*" + match):
        save_identity(make_identity(face_embedding=bad), tmp_path / "bad.safetensors")
    path = tmp_path / "raw.safetensors"
    write_raw(path, {"tokens": random_tokens(8, 6), "face_embedding": bad}, format_version="2")
    with pytest.raises(IdentityFileError, match="damaged.*" + match):
        load_identity(path)


def test_mean_face_embedding_is_the_normalised_mean_of_normalised_rows():
    e = unit(1, 3) * torch.tensor([[1.0], [5.0], [0.2]])        # norms must not act as weights
    ref = unit(1, 3).mean(0)
    torch.testing.assert_close(mean_face_embedding(e), ref / ref.norm())
    w = mean_face_embedding(e, [1.0, 0.0, 0.0])
    torch.testing.assert_close(w, unit(1, 3)[0])
    with pytest.raises(IdentityFileError, match=r"\[N, 512\] with N >= 1"):
        mean_face_embedding(torch.zeros(0, 512))
    with pytest.raises(IdentityFileError, match="zero"):
        mean_face_embedding(torch.cat([unit(2), -unit(2)]))


def test_mixed_identity_carries_the_mixed_face_embedding():
    a = make_identity(seed=1, face_embedding=unit(1)[0])
    b = make_identity(seed=2, face_embedding=unit(2)[0])
    m = mix_identities([a, b], [0.25, 0.75])
    ref = 0.25 * unit(1)[0] + 0.75 * unit(2)[0]
    torch.testing.assert_close(m.face_embedding, ref / ref.norm())
    assert mix_identities([a, make_identity(seed=3)], [0.5, 0.5]).face_embedding is None


# ----------------------------------------------------------------- mixing identities


def test_mix_identities():
    a = make_identity(seed=1, base_q=16, num_images=2)
    b = make_identity(seed=2, base_q=16, num_images=5)
    mixed = mix_identities([a, b], [0.25, 0.75])
    torch.testing.assert_close(mixed.tokens, mix_tokens([a.tokens, b.tokens], [0.25, 0.75]), rtol=0, atol=0)
    torch.testing.assert_close(mixed.base_tokens, mix_tokens([a.base_tokens, b.base_tokens], [0.25, 0.75]),
                               rtol=0, atol=0)
    assert mixed.num_images == 7 and mixed.model_fingerprint == a.model_fingerprint
    torch.testing.assert_close(mix_identities([a, b], [1, 0]).tokens, a.tokens, rtol=0, atol=1e-6)
    assert mix_identities([a, make_identity(seed=3)], [0.5, 0.5]).base_tokens is None
    other = make_identity(seed=4, model_name="other", model_fingerprint="0" * 64)
    with pytest.raises(IdentityFileError, match="Identity 2 was made with the model 'other' and identity 1 with 'tiny_model'"):
        mix_identities([a, other], [0.5, 0.5])
    with pytest.raises(LoraError, match="add up to 0"):
        mix_identities([a, b], [1, -1])


def test_identity_whose_header_size_starts_with_0x80_loads(tmp_path):
    """A safetensors header length whose low byte is 0x80 (the pickle opcode) must not look like a pickle."""
    path = tmp_path / "id.safetensors"
    for n in range(256):
        save_identity(make_identity(model_name="m" * n), path)
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert load_identity(path).model_name == "m" * n


# ----------------------------------------------------------------- with a real (tiny, random) HyperLoRA model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random models: 'a' (with Base-LoRA), 'b' (other weights, same shapes), 'a' again with other
    weights under the same folder name, one with another K, one without Base-LoRA."""
    from dataclasses import replace

    from hyperlora.checkpoint import load_hyper_lora
    from tests.fixtures.hyperlora_models import write_hyperlora_folder

    root = tmp_path_factory.mktemp("identity_models")
    specs = {
        "a": (root / "tiny_a", dict(base=True, seed=0)),
        "b": (root / "tiny_b", dict(base=True, seed=1)),
        "a_v2": (root / "v2" / "tiny_a", dict(base=True, seed=2)),
        "k5": (root / "tiny_k5", dict(preset=replace(TINY, hyper_dim=5))),
        "no_base": (root / "tiny_no_base", dict(base=False, seed=0)),
    }
    return {key: load_hyper_lora(write_hyperlora_folder(folder, **kw), dtype=torch.float32)
            for key, (folder, kw) in specs.items()}


def identity_of(model, *, seed: int = 0, n: int = 2) -> Identity:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1)
    clip = torch.randn(n, 257, 1024, generator=g)
    with torch.inference_mode():
        tokens = model.id_tokens(id_embeds=embeds, clip_features=clip)
        base = model.base_tokens(clip) if model.base_resampler is not None else None
    return Identity(tokens=tokens.clone(), base_tokens=None if base is None else base.clone(), model_name=model.name,
                    model_fingerprint=model.fingerprint, num_images=n, settings=dict(SETTINGS))


def test_rebuilt_lora_from_file_is_bit_exact(tmp_path, models):
    model = models["a"]
    ident = identity_of(model)
    path = tmp_path / "person.safetensors"
    save_identity(ident, path)
    back = load_identity(path)
    check_identity_fits(back, model, need_base=True)
    for kind, tokens, loaded in (("id", ident.tokens, back.tokens), ("base", ident.base_tokens, back.base_tokens)):
        with torch.inference_mode():
            want, got = model.build_lora(tokens, kind=kind), model.build_lora(loaded, kind=kind)
        assert list(got) == list(want)
        for key in want:
            assert torch.equal(got[key], want[key]), (kind, key)
    assert back.model_name == "tiny_a" and back.model_fingerprint == model.fingerprint


def test_identity_for_another_model_is_refused(models):
    ident = identity_of(models["a"])
    check_identity_fits(ident, models["a"])
    with pytest.raises(IdentityFileError) as err:
        check_identity_fits(ident, models["b"])
    msg = str(err.value)
    assert "made with the HyperLoRA model 'tiny_a'" in msg and "the loaded model is 'tiny_b'" in msg
    assert "Re-create the identity from the photos with the model 'tiny_b', or load the model 'tiny_a'" in msg
    with pytest.raises(IdentityFileError, match="different version of the HyperLoRA model 'tiny_a'"):
        check_identity_fits(ident, models["a_v2"])
    with pytest.raises(IdentityFileError, match=r"has \[40, 6\] tokens, but the loaded model 'tiny_k5' needs \[40, 5\]"):
        check_identity_fits(ident, models["k5"])


def test_base_lora_requirements(models):
    with_base = identity_of(models["a"])
    check_identity_fits(with_base, models["a"], need_base=True)
    no_base = identity_of(models["no_base"])
    assert no_base.base_tokens is None
    with pytest.raises(IdentityFileError, match="has no Base-LoRA tokens; re-create it .* 'tiny_a'"):
        check_identity_fits(Identity(with_base.tokens, None, "tiny_a", models["a"].fingerprint, 1, {}),
                            models["a"], need_base=True)
    with pytest.raises(IdentityFileError, match="model 'tiny_no_base' has no Base-LoRA"):
        check_identity_fits(Identity(no_base.tokens, with_base.base_tokens, "tiny_no_base",
                                     models["no_base"].fingerprint, 1, {}), models["no_base"], need_base=True)
    wrong = Identity(with_base.tokens, with_base.base_tokens[:8], "tiny_a", models["a"].fingerprint, 1, {})
    with pytest.raises(IdentityFileError, match=r"Base-LoRA tokens \[8, 6\] do not fit the model 'tiny_a' \(\[40, 6\]\)"):
        check_identity_fits(wrong, models["a"])


def test_algebra_on_generated_loras(models):
    """Coefficient mixing and weight-space sums on real generated LoRAs (ranks 4 and 2)."""
    from hyperlora.lora import lora_rank, weighted_sum
    from tests.fixtures.loras import reference_deltas

    model = models["a"]
    a, b = identity_of(model, seed=1), identity_of(model, seed=2)
    with torch.inference_mode():
        lora_a = model.build_lora(a.tokens)
        lora_base = model.build_lora(a.base_tokens, kind="base")
        mixed_end = model.build_lora(mix_tokens([a.tokens, b.tokens], [1.0, 0.0]))
    for key in lora_a:
        torch.testing.assert_close(mixed_end[key], lora_a[key], rtol=1e-5, atol=1e-6)
    both = weighted_sum([lora_a, lora_base], [0.85, 0.85])
    assert lora_rank(lora_a) == 4 and lora_rank(lora_base) == 2 and lora_rank(both) == 6
    ra, rb, got = reference_deltas(lora_a), reference_deltas(lora_base), reference_deltas(both)
    for prefix, dw in got.items():
        want = 0.85 * (ra[prefix] + rb[prefix])
        assert (dw - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("scale, says", [(0.0, "its tokens are all zero"),
                                         (1e6, "its tokens are not unit vectors: token 0 has length 1e\\+06"),
                                         (0.5, "token 0 has length 0.5")])
def test_tokens_that_are_not_unit_vectors_are_refused_at_load_and_save(tmp_path, scale, says):
    """The resampler's tokens all have length 1 (normalize_tokens is its last step): all-zero tokens would
    build a LoRA that does nothing, tokens x 1e6 one whose weight changes are 1e6 times too large."""
    tokens = random_tokens(8, 6) * scale
    path = tmp_path / "scaled.safetensors"
    write_raw(path, {"tokens": tokens})
    with pytest.raises(IdentityFileError, match=f"damaged: .*{says}.*length 1 .*Identity from Images"):
        load_identity(path)
    with pytest.raises(IdentityFileError, match=f"Cannot save the identity.*{says}"):
        save_identity(Identity(tokens, None, "m", "x", 1, {}), tmp_path / "out.safetensors")
    base = tmp_path / "base.safetensors"
    write_raw(base, {"tokens": random_tokens(8, 6), "base_tokens": random_tokens(4, 6) * scale}, base_num_queries="4")
    with pytest.raises(IdentityFileError, match="its Base-LoRA tokens are"):
        load_identity(base)


def test_unit_tokens_in_float16_still_load(tmp_path):
    """float16 rounding moves a unit token's length by about 1e-3, inside the tolerance."""
    from hyperlora.lora import TOKEN_NORM_TOLERANCE, normalize_tokens, token_norm_deviation

    tokens = normalize_tokens(torch.randn(1120, 128, generator=torch.Generator().manual_seed(0))).half()
    assert float(token_norm_deviation(tokens).max()) < TOKEN_NORM_TOLERANCE
    path = tmp_path / "half.safetensors"
    write_raw(path, {"tokens": tokens}, num_queries="1120", hyper_dim="128")
    assert load_identity(path).tokens.shape == (1120, 128)
