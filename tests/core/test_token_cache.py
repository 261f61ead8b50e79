"""The resampler token cache: a re-queue runs no resampler and returns the same bits; every input of
the result is part of the key; bounded, thread-safe, off for models changed in memory."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hyperlora import generate
from hyperlora.cache import LRU, digest
from hyperlora.checkpoint import load_hyper_lora
from hyperlora.generate import HyperLoRAModel, clear_token_cache
from tests.fixtures.hyperlora_models import write_hyperlora_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hyperlora_folder(tmp_path_factory.mktemp("tc") / "tiny_model", base=True)


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    clear_token_cache()
    yield
    clear_token_cache()


class Calls:
    """Counts forward calls of the model's resamplers (real modules, a forward hook each)."""

    def __init__(self, model: HyperLoRAModel) -> None:
        self.n = 0
        self.handles = [m.register_forward_hook(self._hook) for m in (model.resampler, model.base_resampler)
                        if m is not None]

    def _hook(self, *_: object) -> None:
        self.n += 1


def _inputs(n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1),
            torch.randn(n, 257, 1024, generator=g))


def test_requeue_runs_no_resampler_and_returns_identical_tokens(folder: Path) -> None:
    model = load_hyper_lora(folder, dtype=torch.float32)
    calls = Calls(model)
    e, c = _inputs(3)
    first = model.id_tokens(id_embeds=e, clip_features=c, chunk=2)
    assert calls.n == 2                                   # two chunks
    again = model.id_tokens(id_embeds=e.clone(), clip_features=c.clone(), chunk=2)
    assert calls.n == 2 and torch.equal(first, again)     # no resampler, same bits
    again.add_(1.0)                                       # the caller's copy: the cache keeps its own
    assert torch.equal(model.id_tokens(id_embeds=e, clip_features=c, chunk=2), first)
    fresh = model.id_tokens(id_embeds=e, clip_features=c, chunk=2, use_cache=False)   # the path test_generate
    assert calls.n == 4 and torch.equal(fresh, first)                                   # checks against float64
    base = model.base_tokens(c)
    assert calls.n == 5 and torch.equal(model.base_tokens(c), base) and calls.n == 5
    # a model loaded again from the same files (ComfyUI dropped and reloaded it) hits too
    other = load_hyper_lora(folder, dtype=torch.float32)
    other_calls = Calls(other)
    assert torch.equal(other.id_tokens(id_embeds=e, clip_features=c, chunk=2), first) and other_calls.n == 0


def test_every_key_component_changes_the_key(folder: Path, tmp_path: Path) -> None:
    model = load_hyper_lora(folder, dtype=torch.float32)
    e, c = _inputs()
    key = model.token_key("id", e, c)
    assert key is not None and model.token_key("id", e.clone(), c.clone()) == key
    e2, c2 = e.clone(), c.clone()
    e2[1, 7] += 1e-6
    c2[0, 256, 1023] = -c2[0, 256, 1023]
    twin = write_hyperlora_folder(tmp_path / "twin", base=True, seed=1)   # same shapes, other weights
    variants = {
        "id embedding": model.token_key("id", e2, c),
        "clip features": model.token_key("id", e, c2),
        "feature dtype": model.token_key("id", e.double(), c),
        "one photo less": model.token_key("id", e[:1], c[:1]),
        "weights": model.token_key("id", e, c, weights=torch.tensor([1.0, 2.0])),
        "chunk": model.token_key("id", e, c, chunk=1),
        "kind": model.token_key("base", e, c),
        "model files": load_hyper_lora(twin, dtype=torch.float32).token_key("id", e, c),
        "heads": load_hyper_lora(folder, dtype=torch.float32, heads=2).token_key("id", e, c),
        "precision": load_hyper_lora(folder, dtype=torch.float32,
                                     resampler_dtype=torch.float64).token_key("id", e, c),
    }
    for what, k in variants.items():
        assert k is not None and k != key, what
    assert len(set(variants.values())) == len(variants)
    # the key follows the device type the resampler runs on (CPU and GPU kernels round differently)
    assert key[4] == "cpu"
    # and a changed key means a fresh run: twin's tokens are not folder's
    calls = Calls(model)
    tokens = model.id_tokens(id_embeds=e, clip_features=c)
    assert not torch.equal(load_hyper_lora(twin, dtype=torch.float32).id_tokens(id_embeds=e, clip_features=c), tokens)
    assert calls.n == 1 and len(generate.TOKEN_CACHE) == 2


def test_no_caching_without_fingerprint_or_after_in_place_change(folder: Path) -> None:
    model = load_hyper_lora(folder, dtype=torch.float32)
    e, c = _inputs()
    before = model.id_tokens(id_embeds=e, clip_features=c)
    with torch.no_grad():
        model.resampler.proj_out.bias.add_(0.5)           # e.g. a training step on the loaded model
    assert model.token_key("id", e, c) is None
    calls = Calls(model)
    after = model.id_tokens(id_embeds=e, clip_features=c)
    assert calls.n == 1 and not torch.equal(after, before)
    model.fingerprint = ""
    assert model.token_key("id", e, c) is None
    # inference tensors (ComfyUI loads under inference_mode) keep no version counter: cached
    with torch.inference_mode():
        loaded = load_hyper_lora(folder, dtype=torch.float32)
    assert loaded.token_key("id", e, c) is not None


def test_cache_is_bounded_lru(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate, "TOKEN_CACHE", LRU(3))
    model = load_hyper_lora(folder, dtype=torch.float32)
    calls = Calls(model)
    sets = [_inputs(1, seed=s) for s in range(4)]
    for e, c in sets[:3]:
        model.id_tokens(id_embeds=e, clip_features=c)
    model.id_tokens(id_embeds=sets[0][0], clip_features=sets[0][1])     # refresh set 0
    model.id_tokens(id_embeds=sets[3][0], clip_features=sets[3][1])     # evicts set 1, the oldest
    assert len(generate.TOKEN_CACHE) == 3 and calls.n == 4
    model.id_tokens(id_embeds=sets[0][0], clip_features=sets[0][1])
    assert calls.n == 4
    model.id_tokens(id_embeds=sets[1][0], clip_features=sets[1][1])
    assert calls.n == 5


def test_concurrent_requeues_agree(folder: Path) -> None:
    model = load_hyper_lora(folder, dtype=torch.float32)
    e, c = _inputs()
    want = model.id_tokens(id_embeds=e, clip_features=c, use_cache=False)
    results: list[torch.Tensor] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(5):
            t = model.id_tokens(id_embeds=e, clip_features=c)
            with lock:
                results.append(t)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and all(torch.equal(r, want) for r in results)
    assert len(generate.TOKEN_CACHE) == 1


def test_lru_under_threads() -> None:
    lru: LRU[int] = LRU(16)

    def work(start: int) -> None:
        for i in range(start, start + 500):
            lru.put(i % 40, i)
            lru.get((i * 7) % 40)

    threads = [threading.Thread(target=work, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lru) == 16


def test_digest_is_device_and_layout_independent_but_value_and_dtype_dependent() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert digest(t) == digest(t.t().contiguous().t())      # same values, other memory layout
    assert digest(t) != digest(t.to(torch.bfloat16)) != digest(t.double())
    assert digest(t) != digest(t.reshape(4, 3))
    assert digest(t, None) != digest(None, t) != digest(t)
    assert digest(t[:0]) != digest(t[:, :0])
