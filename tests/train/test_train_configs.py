"""The shipped training configs: the accelerate YAMLs parse as `accelerate launch` reads them (every nested
key known to its launcher) with the intended topology, and the fit JSONs load through FitConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("accelerate")

from accelerate.commands.config.config_args import load_config_from_file  # noqa: E402
from accelerate.commands.launch import _validate_launch_command, launch_command_parser  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from hyperlora.train.config import FitConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "hyperlora" / "train" / "configs"

# file -> (distributed type, processes, machines, mixed precision)
EXPECTED = {
    "accelerate_1gpu.yaml": (DistributedType.NO, 1, 1),
    "accelerate_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "accelerate_2x8gpu.yaml": (DistributedType.MULTI_GPU, 16, 2),
    "accelerate_fsdp.yaml": (DistributedType.FSDP, 8, 1),
    "accelerate_deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, 1),
}


def _launch_args(*argv: str):
    parser = launch_command_parser()
    args = parser.parse_args([*argv, "-m", "hyperlora.train", "fit", "--config", "fit.json"])
    return parser, args


def test_every_shipped_yaml_is_expected():
    assert sorted(p.name for p in CONFIGS.glob("accelerate_*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_parses_as_the_launcher_reads_it(name):
    path = CONFIGS / name
    cfg = load_config_from_file(str(path))          # unknown top-level keys raise here
    kind, procs, machines = EXPECTED[name]
    assert cfg.distributed_type == kind and cfg.num_processes == procs and cfg.num_machines == machines
    assert cfg.mixed_precision == "bf16"
    parser, args = _launch_args("--config_file", str(path))
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == procs and args.num_machines == machines and args.mixed_precision == "bf16"
    assert args.module and args.training_script == "hyperlora.train"
    assert args.training_script_args == ["fit", "--config", "fit.json"]
    # nested FSDP / DeepSpeed keys become launcher options; a misspelt one would be dropped silently
    known = {a.dest for a in parser._actions}
    nested = {**cfg.fsdp_config, **cfg.deepspeed_config}
    assert not set(nested) - known, f"{name}: keys accelerate launch does not know: {set(nested) - known}"
    assert args.use_fsdp == (kind == DistributedType.FSDP)
    assert args.use_deepspeed == (kind == DistributedType.DEEPSPEED)
    assert args.multi_gpu == (kind == DistributedType.MULTI_GPU)


def test_two_node_config_placeholders_and_command_line_override():
    path = CONFIGS / "accelerate_2x8gpu.yaml"
    text = path.read_text(encoding="utf-8")
    assert "EDIT" in text and "machine_rank" in text and "main_process_ip" in text   # documented placeholders
    _, args = _launch_args("--config_file", str(path), "--machine_rank", "1", "--main_process_ip", "192.168.7.2")
    args, _, _ = _validate_launch_command(args)
    assert args.machine_rank == 1 and args.main_process_ip == "192.168.7.2" and args.main_process_port == 29500
    _, args = _launch_args("--config_file", str(path))
    args, _, _ = _validate_launch_command(args)
    assert args.machine_rank == 0 and args.main_process_ip == "10.0.0.1"


def test_fsdp_and_deepspeed_settings():
    fsdp = load_config_from_file(str(CONFIGS / "accelerate_fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "NO_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    ds = load_config_from_file(str(CONFIGS / "accelerate_deepspeed_zero2.yaml")).deepspeed_config
    assert ds["zero_stage"] == 2 and ds["offload_optimizer_device"] == "none"
    paper = FitConfig.from_json(CONFIGS / "fit_paper.json")
    assert ds["gradient_clipping"] == paper.max_grad_norm
    assert ds["gradient_accumulation_steps"] == paper.gradient_accumulation


def test_fit_paper_json_has_the_paper_schedule():
    cfg = FitConfig.from_json(CONFIGS / "fit_paper.json")
    assert [(s.stage, s.steps) for s in cfg.stages] == [(1, 20000), (2, 15000), (3, 55000)]
    assert cfg.total_steps == 90000
    m = cfg.model
    assert (m.rank, m.base_rank, m.hyper_dim) == (8, 4, 128)
    assert (m.heads, m.dim, m.depth, m.dim_head, m.num_id_tokens) == (12, 1024, 4, 64, 16)   # the released sizes
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
    assert abs(sum(cfg.scenarios.values()) - 1.0) < 1e-9 and min(cfg.scenarios.values()) > 0
    assert Path(cfg.base_model).is_absolute() and "~" not in cfg.base_model      # ~ expanded, not package-relative


def test_fit_toy_json_is_small_and_complete(tmp_path):
    cfg = FitConfig.from_json(CONFIGS / "fit_toy.json")
    assert [s.stage for s in cfg.stages] == [1, 2, 3] and all(s.steps > 0 for s in cfg.stages)
    assert cfg.total_steps <= 1000
    assert cfg.model.hyper_dim < 128 and cfg.model.dim < 1024
    assert cfg.mixed_precision == "no"            # CPU
    # its paths are relative to the JSON: a copy next to a toy folder resolves there
    copy = tmp_path / "fit.json"
    copy.write_text((CONFIGS / "fit_toy.json").read_text(encoding="utf-8"), encoding="utf-8")
    moved = FitConfig.from_json(copy)
    assert Path(moved.base_model) == tmp_path / "toy" / "sdxl" and Path(moved.out) == tmp_path / "toy" / "run"


def _deepspeed_plugin_as_launched(monkeypatch: pytest.MonkeyPatch, path: Path):
    """accelerate's DeepSpeedPlugin built from the environment `accelerate launch --config_file path` sets."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    parser, args = _launch_args("--config_file", str(path))
    args, defaults, mp_from_config = _validate_launch_command(args)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)        # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    for k, v in env.items():
        if k.startswith("ACCELERATE_"):
            monkeypatch.setenv(k, v)
    return DeepSpeedPlugin()


def test_deepspeed_zero2_yaml_gets_a_micro_batch(monkeypatch: pytest.MonkeyPatch):
    """The shipped ZeRO-2 YAML leaves train_micro_batch_size_per_gpu at "auto"; fit hands accelerate no
    DataLoader, so accelerate.prepare would raise.  fit fills it from the fit config first (GPU-only engine:
    the run itself is bench/engine_check.py's)."""
    from hyperlora.errors import SettingError
    from hyperlora.train import engine

    plugin = _deepspeed_plugin_as_launched(monkeypatch, CONFIGS / "accelerate_deepspeed_zero2.yaml")
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2
    assert plugin.is_auto("train_micro_batch_size_per_gpu")                # what made prepare raise
    paper = FitConfig.from_json(CONFIGS / "fit_paper.json")
    engine.fill_deepspeed_batch(plugin, paper.batch_size, paper.gradient_accumulation)
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert plugin.get_value("train_micro_batch_size_per_gpu") == paper.batch_size == 4
    assert plugin.get_value("gradient_accumulation_steps") == paper.gradient_accumulation
    with pytest.raises(SettingError, match="gradient_accumulation"):
        engine.fill_deepspeed_batch(plugin, paper.batch_size, paper.gradient_accumulation + 1)
    with pytest.raises(SettingError, match="batch_size"):
        engine.fill_deepspeed_batch(plugin, paper.batch_size + 1, paper.gradient_accumulation)
