"""hyperlora.train.engine: freezing per stage that holds under any engine, batch-size-free loss weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hyperlora.train import engine
from hyperlora.train.config import STAGE_PARTS
from hyperlora.train.fit import Trainer, collate
from hyperlora.train.hypernet import PARTS
from hyperlora.train.toy.sdxl import tiny_unet

from .test_fit import scheduler, toy_config
from .test_hypernet import ToyDataset, tiny_generator


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_unet(seed=0).requires_grad_(False).eval()


def _step(trainer: Trainer, stage: str, seed: int) -> None:
    ds = ToyDataset(4, seed=seed)
    batch = collate([ds[i] for i in range(2)], torch.device("cpu"))
    trainer.loss(stage, batch, torch.Generator().manual_seed(seed), lambda loss: loss.backward())


def _zero_fill(gen: torch.nn.Module) -> None:
    """What DeepSpeed ZeRO does with a parameter that got no gradient: steps it with zeros."""
    for p in gen.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def test_param_groups_cover_every_parameter_once(unet: torch.nn.Module) -> None:
    gen = tiny_generator(unet, seed=1)
    groups = engine.param_groups(gen, 1e-3, 0.01)
    assert [g["part"] for g in groups] == [p for p in PARTS if any(True for _ in gen.part_parameters([p]))]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(gen.parameters()))
    opt = torch.optim.AdamW(groups)
    trainable = engine.enter_stage(gen, opt, STAGE_PARTS[2], 5e-4)
    assert {gen.part_of(n) for n, p in gen.named_parameters() if p.requires_grad} == set(STAGE_PARTS[2])
    assert {id(p) for p in trainable} == {id(p) for _, p in gen.part_parameters(STAGE_PARTS[2])}
    assert {g["part"]: g["lr"] for g in opt.param_groups} == {g["part"]: (5e-4 if g["part"] in STAGE_PARTS[2] else 0.0)
                                                                for g in groups}
    with pytest.raises(RuntimeError, match="param_groups"):
        engine.enter_stage(gen, torch.optim.AdamW(gen.parameters()), STAGE_PARTS[1], 1e-3)


@pytest.mark.parametrize("strategy", ["engine", "old"])
def test_frozen_parts_stay_put_when_the_engine_steps_every_parameter(unet: torch.nn.Module, tmp_path: Path,
                                                                     strategy: str) -> None:
    """Stage 1 gives the Base parts AdamW momentum; in stage 2 an engine that steps every parameter it holds
    (DeepSpeed: zero-filled gradients) must still leave them bit-identical.  The old freezing (one group,
    gradients dropped after the engine had stepped) moves them: the control, which must fail."""
    gen = tiny_generator(unet, seed=1)
    trainer = Trainer(unet, gen, scheduler(), toy_config(tmp_path))
    if strategy == "engine":
        opt = torch.optim.AdamW(engine.param_groups(gen, 1e-2, 0.1))
        engine.enter_stage(gen, opt, STAGE_PARTS[1], 1e-2)
    else:
        opt = torch.optim.AdamW(gen.parameters(), lr=1e-2, weight_decay=0.1)
    _step(trainer, "1", 0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    if strategy == "engine":
        engine.enter_stage(gen, opt, STAGE_PARTS[2], 1e-2)
    _step(trainer, "2", 1)
    if strategy == "engine":            # frozen parts: no gradient computed at all
        assert all(p.grad is None for n, p in gen.named_parameters() if gen.part_of(n) not in STAGE_PARTS[2])
    _zero_fill(gen)
    opt.step()
    moved = {gen.part_of(n) for n, p in gen.named_parameters() if not torch.equal(p, before[n])}
    if strategy == "engine":
        assert moved == set(STAGE_PARTS[2])
    else:
        assert moved - set(STAGE_PARTS[2]), "the control should move a frozen part"


def _scenario_weights(trainer: Trainer, batch: int, draws: int, weights: dict[str, float]) -> dict[str, float]:
    """The average over ``draws`` scenario draws (fit's own sampler) of each scenario's weight in the batch
    loss: d loss / d (its per-sample losses), summed over its samples, with every per-sample loss equal."""
    g = torch.Generator().manual_seed(7)
    acc: dict[str, float] = {}
    for _ in range(draws):
        scen = trainer.scenarios("2", batch, g)
        per = torch.ones(batch, requires_grad=True)
        engine.weighted_loss(per, scen, weights).backward()
        for s, w in zip(scen, per.grad.tolist()):
            acc[s] = acc.get(s, 0.0) + w / draws
    return acc


def test_scenario_weights_do_not_depend_on_the_batch_size(unet: torch.nn.Module, tmp_path: Path) -> None:
    """0.8 / 0.1 / 0.1 scenarios: each scenario weighs p_s x w_s at batch 8 and at batch 32 alike (a sum of
    per-scenario means weighs a 10 % regulariser about 0.57 at batch 8 and about 0.97, as much as
    reconstruction, at batch 32)."""
    weights = {"recon": 1.0, "id_only": 0.5, "base_id": 2.0}
    cfg = toy_config(tmp_path, scenarios={"recon": 0.8, "id_only": 0.1, "base_id": 0.1}, scenario_weights=weights)
    trainer = Trainer(unet, tiny_generator(unet, seed=1), scheduler(), cfg)
    w8 = _scenario_weights(trainer, 8, 800, weights)
    w32 = _scenario_weights(trainer, 32, 200, weights)
    for s, p in cfg.scenarios.items():
        assert w8[s] == pytest.approx(p * weights[s], abs=0.02), (s, w8)
        assert w32[s] == pytest.approx(p * weights[s], abs=0.02), (s, w32)
    # identical per-sample losses: the batch of 32 is the batch of 8 four times -> the same loss
    scen8 = ["recon"] * 6 + ["id_only", "base_id"]
    per8 = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert float(engine.weighted_loss(per8.repeat(4), scen8 * 4, weights)) == pytest.approx(
        float(engine.weighted_loss(per8, scen8, weights)), rel=1e-6)
    with pytest.raises(ValueError, match="scenarios"):
        engine.weighted_loss(per8, scen8[:3], weights)


def test_trainer_loss_is_the_weighted_batch_mean(unet: torch.nn.Module, tmp_path: Path) -> None:
    """The loss fit back-propagates is sum_s w_s x (sum of s's per-sample losses) / B, not sum_s w_s x mean_s."""
    weights = {"recon": 1.0, "id_only": 0.5, "base_id": 2.0}
    cfg = toy_config(tmp_path, scenarios={"recon": 0.4, "id_only": 0.3, "base_id": 0.3}, scenario_weights=weights)
    trainer = Trainer(unet, tiny_generator(unet, seed=1), scheduler(), cfg)
    ds = ToyDataset(8, seed=2)
    batch = collate([ds[i] for i in range(8)], torch.device("cpu"))
    seen: list[float] = []
    out = trainer.loss("3", batch, torch.Generator().manual_seed(3), lambda loss: seen.append(float(loss.detach())))
    assert sum(n for _, n in out.values()) == 8 and len(out) >= 2          # a mixed batch
    want = sum(weights[s] * v for s, (v, _) in out.items()) / 8
    assert seen == [pytest.approx(want, rel=1e-5)]


def test_distil_teacher_is_a_plain_copy_and_survives_resume(unet: torch.nn.Module, tmp_path: Path) -> None:
    """The distil teacher is built from the gathered state (no deepcopy of the engine's module) and, after
    an interruption inside the distil stage, restored from its file: the same teacher to the last bit."""
    from safetensors.torch import load_file

    from hyperlora.train.fit import fit

    cfg = toy_config(tmp_path / "run", stages=[{"stage": 1, "steps": 1}, {"stage": 2, "steps": 1}],
                     distill_base=0.25, distill_steps=3, checkpoint_every=0)
    cfg.max_steps = 3                                    # stop one step into the distil stage
    first = fit(cfg, dataset=ToyDataset(4), unet=unet, noise_scheduler=scheduler())
    assert first.steps == 3 and first.stage == "distill"
    ck = tmp_path / "run" / "checkpoints" / "step-000003"
    teacher = load_file(str(ck / "distill_teacher.safetensors"))
    gen2 = load_file(str(tmp_path / "run" / "checkpoints" / "step-000003" / "generator.safetensors"))
    assert any(not torch.equal(teacher[k], gen2[k]) for k in teacher)     # the student moved away from it
    cfg.max_steps = None
    done = fit(cfg, dataset=ToyDataset(4), unet=unet, noise_scheduler=scheduler())
    assert done.steps == 5 and done.export is not None
    again = load_file(str(tmp_path / "run" / "checkpoints" / "step-000005" / "distill_teacher.safetensors"))
    assert set(again) == set(teacher) and all(torch.equal(again[k], teacher[k]) for k in teacher)


def _saved_tensors(fn) -> list[torch.Tensor]:
    """Every tensor autograd saves for the backward while ``fn()`` runs (what stays alive until then)."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("stage", ["1", "3"])
def test_bf16_autocast_keeps_no_second_copy_of_the_bases(unet: torch.nn.Module, tmp_path: Path, stage: str) -> None:
    """Under bf16 autocast the float32 bases were cast to bf16 and the copies saved for the backward (a
    second copy of all bases, 4.5 GB at the paper's size); the generator now runs with autocast off."""
    gen = tiny_generator(unet, seed=1)
    trainer = Trainer(unet, gen, scheduler(), toy_config(tmp_path))
    bases = [p.detach().to(torch.bfloat16).flatten().sort().values for n, p in gen.named_parameters()
             if gen.part_of(n) in ("id_basis", "base_basis")]
    ds = ToyDataset(4, seed=2)
    batch = collate([ds[i] for i in range(2)], torch.device("cpu"))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trainer.loss(stage, batch, torch.Generator().manual_seed(0), lambda loss: None)

    saved = _saved_tensors(step)
    assert any(t.dtype == torch.bfloat16 for t in saved)          # autocast was on for the UNet
    copies = [t for t in saved if t.dtype == torch.bfloat16 and
              any(t.numel() == b.numel() and torch.equal(t.flatten().sort().values, b) for b in bases)]
    assert not copies, f"{len(copies)} bf16 copies of bases held for the backward"
    # the float32 bases themselves are what is saved
    assert any(t.dtype == torch.float32 and any(t is p for p in gen.parameters()) for t in saved)


def test_gradient_checkpointing_drops_activation_memory(unet: torch.nn.Module) -> None:
    """The frozen UNet stays in eval() (as fit keeps it); with checkpointing on, the tensors saved for the
    backward (deduplicated by storage) shrink: diffusers >= 0.32 checkpoints in eval mode too."""
    from hyperlora.train.toy.sdxl import tiny_unet as make

    net = make(seed=0).requires_grad_(False).eval()
    ds = ToyDataset(4, seed=2)
    batch = collate([ds[i] for i in range(2)], torch.device("cpu"))
    x = batch["latents"].clone().requires_grad_(True)           # the gradient path through the frozen UNet

    def step() -> None:
        out = net(x, torch.tensor([500, 500]), encoder_hidden_states=batch["text"],
                  added_cond_kwargs={"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}).sample
        out.square().mean().backward()

    def saved_bytes() -> int:
        seen: dict[int, int] = {}
        for t in _saved_tensors(step):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    plain = saved_bytes()
    net.enable_gradient_checkpointing()
    assert not net.training
    checkpointed = saved_bytes()
    assert checkpointed < 0.5 * plain, (checkpointed, plain)
    engine.check_checkpointing_support()                        # the installed diffusers is new enough


def test_old_diffusers_is_refused_for_checkpointing(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers

    from hyperlora.errors import SettingError

    monkeypatch.setattr(diffusers, "__version__", "0.27.2")
    with pytest.raises(SettingError, match=r"diffusers>=0\.32"):
        engine.check_checkpointing_support()
    monkeypatch.setattr(diffusers, "__version__", "0.32.0.dev0")
    engine.check_checkpointing_support()
