"""Tests for common.config: YAML + overrides, validation messages that name the key, paths, round trips."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from common.config import CoarseTrainConfig, FineTrainConfig, PrepareConfig
from common.core.defaults import HU_WINDOW
from common.core.typed_config import (
    ConfigError,
    HelpRequested,
    cfg_field,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_cli,
    path_field,
    save_config,
    section,
)


# Schemas are declared at module level: annotations are strings (`from __future__ import annotations`) and are
# resolved in the module's namespace.
@dataclasses.dataclass
class Toy:
    a: str = path_field("a_dir")
    b: str = path_field("b_dir")
    c: str = path_field("c_dir")
    d: str = "d_dir"
    e: str | None = cfg_field(None, path=True)


@dataclasses.dataclass
class Inner:
    n: int = cfg_field(1, ge=1)
    xs: list[float] = cfg_field([1.0, 2.0], length=2)


@dataclasses.dataclass
class Outer:
    inner: Inner = section(Inner, n=5)


def write_yaml(folder: Path, text: str, name: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(schema, path: Path, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(schema, path, overrides)
    return info.value


# ---------------------------------------------------------------------------------------------- defaults
def test_coarse_defaults_match_interfaces():
    cfg = CoarseTrainConfig()
    assert cfg.data_base_dir == "../dataset" and cfg.output_dir == "output"
    assert (cfg.fold, cfg.device, cfg.seed, cfg.step) == (1, "auto", 0, "train")
    assert cfg.data.labeled_db == "db/seg_train_fold_{fold}"
    assert cfg.data.unlabeled_db == "db/seg_trainu"
    assert cfg.data.val_db == "db/seg_val_fold_{fold}"
    assert cfg.data.size_zyx == [160, 160, 160] and cfg.data.hu_window == list(HU_WINDOW)
    assert (cfg.data.labeled_batch_size, cfg.data.unlabeled_batch_size, cfg.data.num_workers) == (1, 1, 2)
    assert cfg.model.name == "unet" and cfg.model.channels == [16, 32, 64, 128, 256]
    assert (cfg.model.dropout, cfg.model.seed_a, cfg.model.seed_b) == (0.2, 1, 2)
    assert cfg.optim.lr == 1e-2 and cfg.optim.betas == [0.9, 0.99] and cfg.optim.weight_decay == 5e-5
    s = cfg.schedule
    assert (s.iterations, s.lr_drop_at, s.lr_drop_factor) == (20000, [0.66, 0.86], [0.1, 0.05])
    assert (s.val_interval, s.checkpoint_interval, s.log_interval) == (500, 100, 10)
    assert cfg.loss.name == "dice_focal"
    assert (cfg.cps.weight, cfg.cps.rampup_iterations) == (1.0, 0)
    assert (cfg.amp.precision, cfg.amp.compile) == ("bf16", False)
    assert (cfg.export.network, cfg.export.dir) == ("a", "../model_weights/base_coarse_model")


def test_fine_defaults_match_interfaces():
    cfg = FineTrainConfig()
    assert cfg.optim.lr == 1e-3 and cfg.model.name == "efficient_seg_net"
    assert cfg.data.size_zyx == [192, 192, 192] and cfg.loss.name == "dice_bce" and cfg.step == "all"
    assert cfg.export.dir == "../model_weights/efficient_fine_model"
    assert dataclasses.astuple(cfg.crop) == (20.0, 40.0, 0.5, 0.5, 200.0)
    assert cfg.boxes.coarse_model_dir == "../model_weights/base_coarse_model"
    assert (cfg.uif.score, cfg.uif.keep_count, cfg.uif.keep_ratio) == ("disagreement", None, 0.1)
    assert (cfg.round2.init, cfg.round2.iterations) == ("warm", None)
    assert (cfg.uif.rounds, cfg.uif.keep_schedule) == (1, "fixed")
    assert cfg.steps() == ("boxes", "round1", "uif", "round2", "export")
    # sections shared with the coarse stage keep the coarse defaults, except the fine stage's own iteration count
    assert cfg.schedule.iterations == 40000
    coarse_schedule = dataclasses.replace(CoarseTrainConfig().schedule, iterations=40000)
    assert cfg.schedule == coarse_schedule and cfg.cps == CoarseTrainConfig().cps


def test_filtered_rounds_steps_and_keep_schedule(tmp_path):
    cfg = load_config(FineTrainConfig, write_yaml(tmp_path, "uif:\n  rounds: 3\n  keep_count: 4\n"), ["step=uif3"])
    assert cfg.steps() == ("boxes", "round1", "uif", "round2", "uif2", "round3", "uif3", "round4", "export")
    assert [cfg.uif.keep(k) for k in (1, 2, 3)] == [(4, 0.1)] * 3
    growing = dataclasses.replace(cfg.uif, keep_schedule="growing", keep_ratio=0.4)
    assert [growing.keep(k) for k in (1, 2, 3)] == [(4, 0.4), (8, 0.8), (12, 1.0)]


def test_prepare_defaults_match_interfaces():
    cfg = PrepareConfig()
    assert cfg.data_base_dir == "../dataset"
    assert (cfg.train_image_dir, cfg.train_mask_dir, cfg.trainu_image_dir) == ("train_images", "train_mask",
                                                                              "trainu_images")
    assert (cfg.test_image_dir, cfg.test_mask_dir, cfg.file_list_dir) == ("val_images", None, "file_list")
    assert cfg.coarse_size_zyx == [160, 160, 160] and cfg.fine_size_zyx == [192, 192, 192]
    assert (cfg.extend_size_mm, cfg.max_extend_size_mm, cfg.hu_window) == (20.0, 40.0, list(HU_WINDOW))
    assert (cfg.val_ratio, cfg.split_seed, cfg.split_5fold, cfg.num_workers, cfg.overwrite) == (0.2, 0, False, 2, False)


def test_default_lists_are_not_shared():
    a, b = CoarseTrainConfig(), CoarseTrainConfig()
    a.model.channels.append(512)
    assert b.model.channels == [16, 32, 64, 128, 256]


# ---------------------------------------------------------------------------------------------- loading
def test_yaml_values_and_nested_overrides(tmp_path):
    path = write_yaml(tmp_path, "fold: 2\noptim:\n  lr: 1e-3\n  betas: [0.5, 0.9]\namp:\n  precision: fp32\n")
    cfg = load_config(CoarseTrainConfig, path, ["optim.weight_decay=0", "schedule.iterations=7",
                                                "model.channels=[4,8,8,16,16]", "device=cuda:1"])
    assert cfg.fold == 2 and cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.5, 0.9]
    assert cfg.amp.precision == "fp32"  # lr `1e-3`: a string to PyYAML, taken as a float by the float field
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)  # int accepted for float
    assert cfg.schedule.iterations == 7 and cfg.model.channels == [4, 8, 8, 16, 16] and cfg.device == "cuda:1"
    assert cfg.optim.lr == 1e-3 and cfg.schedule.lr_drop_at == [0.66, 0.86]  # untouched keys keep file/defaults


def test_override_beats_file(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: 0.5\n")
    cfg = load_config(FineTrainConfig, path, ["optim.lr=1e-4", "amp.precision=fp16", "boxes.coarse_model_dir=null",
                                              "uif.keep_count=3"])
    assert cfg.optim.lr == 1e-4 and cfg.amp.precision == "fp16"
    assert cfg.boxes.coarse_model_dir is None and cfg.uif.keep_count == 3


@pytest.mark.parametrize("schema", [CoarseTrainConfig, FineTrainConfig])
def test_a_bare_leaf_name_is_an_unknown_key_in_every_stage(tmp_path, schema):
    """No leaf-name shortcut: `lr=` is an error naming `optim.lr` in both stages (it used to work in coarse
    and fail in fine only where the leaf was ambiguous)."""
    err = load_error(schema, write_yaml(tmp_path, ""), ["lr=1e-4"])
    assert err.keys == ["lr"] and "unknown key" in str(err) and "'optim.lr'" in str(err)
    err = load_error(schema, write_yaml(tmp_path, ""), ["iterations=5"])
    assert "unknown key" in str(err) and "schedule.iterations" in str(err)


def test_empty_yaml_gives_defaults(tmp_path):
    cfg = load_config(FineTrainConfig, write_yaml(tmp_path, ""))
    assert cfg.optim.lr == 1e-3 and cfg.model.name == "efficient_seg_net"


def test_section_override_with_mapping_merges(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: 0.5\n  weight_decay: 0.1\n")
    cfg = load_config(CoarseTrainConfig, path, ["optim={lr: 0.25}"])
    assert cfg.optim.lr == 0.25 and cfg.optim.weight_decay == 0.1


def test_str_field_override_keeps_numeric_text(tmp_path):
    cfg = load_config(CoarseTrainConfig, write_yaml(tmp_path, ""), ["data.labeled_db=2024"])
    assert cfg.data.labeled_db == "2024"


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "yaml_text, overrides, key, words",
    [
        ("optim:\n  lrr: 0.1\n", (), "optim.lrr", ["unknown key", "optim.lr"]),
        ("lr: 0.1\n", (), "lr", ["unknown key", "optim.lr"]),
        ("", ["optim.lrr=0.1"], "optim.lrr", ["unknown key", "optim.lr"]),
        ("", ["schedul.iterations=3"], "schedul.iterations", ["unknown key", "schedule.iterations"]),
        ("optim:\n  lr: fast\n", (), "optim.lr", ["expected float", "str"]),
        ("schedule:\n  iterations: 2.5\n", (), "schedule.iterations", ["expected int", "float"]),
        ("schedule:\n  iterations: true\n", (), "schedule.iterations", ["expected int", "bool"]),
        ("amp:\n  compile: 1\n", (), "amp.compile", ["expected bool", "int"]),
        ("model:\n  channels: [4, 8, 8.5, 16, 16]\n", (), "model.channels[2]", ["expected int"]),
        ("model:\n  channels: 4\n", (), "model.channels", ["expected list[int]"]),
        ("optim:\n  betas: [0.9, maybe]\n", (), "optim.betas[1]", ["expected float", "str"]),
        ("optim:\n  betas: [0.9, false]\n", (), "optim.betas[1]", ["expected float", "bool"]),
        ("optim:\n  lr: null\n", (), "optim.lr", ["expected float", "null"]),
        ("uif:\n  keep_count: None\n", (), "uif.keep_count", ["null"]),
        ("", ["uif.keep_count=none"], "uif.keep_count", ["null"]),
        ("boxes:\n  coarse_model_dir: None\n", (), "boxes.coarse_model_dir", ["null"]),
        ("optim:\n  lr: None\n", (), "optim.lr", ["null", "expected float"]),
        ("data:\n  hu_window: [None, 300]\n", (), "data.hu_window[0]", ["null"]),
        ("amp:\n  precision: fp8\n", (), "amp.precision", ["'bf16'", "'fp16'", "'fp32'"]),
        ("loss:\n  name: ce\n", (), "loss.name", ["'dice_bce'", "'dice_focal'", "'dice'"]),
        ("uif:\n  score: variance\n", (), "uif.score", ["'disagreement'", "'entropy'"]),
        ("round2:\n  init: hot\n", (), "round2.init", ["'warm'", "'fresh'"]),
        ("step: predict\n", (), "step", ["'round1'", "'export'"]),
        ("step: round3\n", (), "step", ["'round2'", "uif.rounds=1"]),
        ("step: uif2\n", (), "step", ["'uif'", "uif.rounds=1"]),
        ("uif:\n  rounds: 0\n", (), "uif.rounds", [">= 1"]),
        ("export:\n  round: 3\n", (), "export.round", ["rounds 1..2", "uif.rounds=1"]),
        ("uif:\n  keep_schedule: double\n", (), "uif.keep_schedule", ["'fixed'", "'growing'"]),
        ("export:\n  network: c\n", (), "export.network", ["'a'", "'b'"]),
        ("device: gpu\n", (), "device", ["'cuda:N'", "'auto'"]),
        ("model:\n  name: resnet\n", (), "model.name", ["'unet'", "'efficient_seg_net'"]),
        ("data:\n  num_workers: -1\n", (), "data.num_workers", [">= 0"]),
        ("schedule:\n  iterations: 0\n", (), "schedule.iterations", [">= 1"]),
        ("data:\n  size_zyx: [160, 150, 160]\n", (), "data.size_zyx[1]", ["multiple of 16"]),
        ("data:\n  size_zyx: [160, 160]\n", (), "data.size_zyx", ["3 values"]),
        ("data:\n  hu_window: [300, -300]\n", (), "data.hu_window", ["lower bound"]),
        ("schedule:\n  lr_drop_at: [0.5]\n", (), "schedule.lr_drop_factor", ["one factor per"]),
        ("schedule:\n  lr_drop_at: [0.8, 0.5]\n", (), "schedule.lr_drop_at", ["increasing"]),
        ("optim:\n  lr: 0\n", (), "optim.lr", ["> 0"]),
        ("model:\n  seed_b: 1\n", (), "model.seed_b", ["seed_a"]),
        ("crop:\n  extend_size_mm: 50.0\n", (), "crop.max_extend_size_mm", ["extend_size_mm"]),
        ("uif:\n  keep_ratio: 1.5\n", (), "uif.keep_ratio", ["<= 1"]),
        ("optim: 0.1\n", (), "optim", ["section", "lr"]),
        ("", ["amp=off"], "amp", ["section", "amp.precision"]),
    ],
)
def test_errors_name_the_key(tmp_path, yaml_text, overrides, key, words):
    err = load_error(FineTrainConfig, write_yaml(tmp_path, yaml_text), overrides)
    assert key in err.keys, str(err)
    message = str(err)
    assert f"{key}:" in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    "yaml_text, key, words",
    [
        ("val_ratio: 1.0\n", "val_ratio", ["< 1"]),
        ("val_ratio: -0.1\n", "val_ratio", [">= 0"]),
        ("num_workers: -2\n", "num_workers", [">= 0"]),
        ("fine_size_zyx: [192, 192, 100]\n", "fine_size_zyx[2]", ["multiple of 16"]),
        ("coarse_size_zyx: [160, 160, 160, 160]\n", "coarse_size_zyx", ["3 values"]),
        ("test_mask_dir: None\n", "test_mask_dir", ["null"]),
        ("split_5fold: maybe\n", "split_5fold", ["expected bool"]),
        ("extend_size_mm: 60\n", "max_extend_size_mm", ["extend_size_mm"]),
    ],
)
def test_prepare_errors_name_the_key(tmp_path, yaml_text, key, words):
    err = load_error(PrepareConfig, write_yaml(tmp_path, yaml_text))
    assert key in err.keys and all(word in str(err) for word in words), str(err)


def test_error_says_where_the_value_came_from(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: fast\n")
    assert str(path) in str(load_error(CoarseTrainConfig, path))
    err = load_error(CoarseTrainConfig, write_yaml(tmp_path, ""), ["optim.lr=slow"])
    assert "optim.lr=slow" in str(err)


def test_all_problems_reported_at_once(tmp_path):
    err = load_error(CoarseTrainConfig, write_yaml(tmp_path, "fold: x\nseed: 1.5\noptim:\n  lr: y\n"))
    assert {"fold", "seed", "optim.lr"} <= set(err.keys)


def test_malformed_override(tmp_path):
    err = load_error(CoarseTrainConfig, write_yaml(tmp_path, ""), ["optim.lr"])
    assert "optim.lr" in str(err) and "key=value" in str(err)
    err = load_error(CoarseTrainConfig, write_yaml(tmp_path, ""), ["=3"])
    assert "empty" in str(err)


def test_bad_files(tmp_path):
    assert "not found" in str(load_error(CoarseTrainConfig, tmp_path / "missing.yaml"))
    assert "not valid YAML" in str(load_error(CoarseTrainConfig, write_yaml(tmp_path, "optim: [1,\n")))
    assert "top level" in str(load_error(CoarseTrainConfig, write_yaml(tmp_path, "- 1\n- 2\n")))
    err = load_error(CoarseTrainConfig, write_yaml(tmp_path, "fold: 1\nfold: 2\n"))
    assert "duplicate key 'fold'" in str(err)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------- paths
def test_paths_resolve_against_yaml_folder(tmp_path, monkeypatch):
    stage = tmp_path / "repo" / "fine_efficient_seg"
    path = write_yaml(stage, "output_dir: runs/exp1\nboxes:\n  coarse_model_dir: ../weights/coarse\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(FineTrainConfig, path)
    assert cfg.output_dir == str(stage / "runs" / "exp1")
    assert cfg.boxes.coarse_model_dir == str(tmp_path / "repo" / "weights" / "coarse")
    # defaults are relative to the shipped config.yaml's folder too
    assert cfg.data_base_dir == str(tmp_path / "repo" / "dataset")
    assert cfg.export.dir == str(tmp_path / "repo" / "model_weights" / "efficient_fine_model")
    # database names and `{fold}` templates are not paths of the config: the stage joins them with data_base_dir
    assert cfg.data.labeled_db == "db/seg_train_fold_{fold}"


def test_override_paths_resolve_against_cwd(tmp_path, monkeypatch):
    stage = tmp_path / "stage"
    path = write_yaml(stage, "output_dir: out_from_file\n")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = load_config(FineTrainConfig, path, ["output_dir=my_out", "export.dir=exported",
                                              "boxes={coarse_model_dir: cm}"])
    assert cfg.output_dir == str(cwd / "my_out")
    assert cfg.export.dir == str(cwd / "exported")
    assert cfg.boxes.coarse_model_dir == str(cwd / "cm")
    assert cfg.data_base_dir == str(tmp_path / "dataset")  # not overridden: YAML folder


def test_absolute_and_home_paths(tmp_path):
    path = write_yaml(tmp_path / "a", f"data_base_dir: {tmp_path / 'data'}\noutput_dir: ~/semiseg_out\n")
    cfg = load_config(CoarseTrainConfig, path)
    assert cfg.data_base_dir == str(tmp_path / "data")
    assert cfg.output_dir == os.path.expanduser("~/semiseg_out")


def test_prepare_data_base_dir_is_a_path(tmp_path):
    cfg = load_config(PrepareConfig, write_yaml(tmp_path / "data_prepare", "train_image_dir: imgs\n"))
    assert cfg.data_base_dir == str(tmp_path / "dataset") and cfg.train_image_dir == "imgs"


def test_path_declaration_styles(tmp_path):
    cfg = load_config(Toy, write_yaml(tmp_path, "e: e_dir\n"))
    assert (cfg.a, cfg.b, cfg.c, cfg.d, cfg.e) == (str(tmp_path / "a_dir"), str(tmp_path / "b_dir"),
                                                   str(tmp_path / "c_dir"), "d_dir", str(tmp_path / "e_dir"))


def test_section_helper_and_custom_schema(tmp_path):
    assert Outer().inner.n == 5 and Outer().inner.xs == [1.0, 2.0]
    cfg = load_config(Outer, write_yaml(tmp_path, "inner:\n  xs: [3, 4]\n"))
    assert cfg.inner.n == 5 and cfg.inner.xs == [3.0, 4.0] and all(isinstance(x, float) for x in cfg.inner.xs)


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("schema", [PrepareConfig, CoarseTrainConfig, FineTrainConfig])
def test_dict_round_trip(schema):
    cfg = schema()
    d = config_to_dict(cfg)
    assert isinstance(d, dict)
    assert config_from_dict(schema, d) == cfg


def test_from_dict_validates_and_resolves_on_request(tmp_path):
    d = config_to_dict(FineTrainConfig())
    d["optim"]["lr"] = "x"
    with pytest.raises(ConfigError, match="optim.lr"):
        config_from_dict(FineTrainConfig, d)
    d = config_to_dict(FineTrainConfig())
    assert config_from_dict(FineTrainConfig, d, base_dir=tmp_path).output_dir == str(tmp_path / "output")
    del d["crop"]  # a checkpoint written before a section existed gets the defaults
    assert config_from_dict(FineTrainConfig, d).crop == FineTrainConfig().crop


def test_save_and_load_round_trip(tmp_path):
    path = write_yaml(tmp_path / "stage", "amp:\n  precision: fp32\nuif:\n  keep_count: 4\n")
    cfg = load_config(FineTrainConfig, path, ["optim.lr=3.0e-4", "model.channels=[2,4,4,8,8]"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    text = out.read_text()
    assert "size_zyx: [192, 192, 192]" in text and "keep_count: 4" in text
    assert not [p for p in out.parent.iterdir() if p.name != "config.yaml"]  # no temporary left behind
    again = load_config(FineTrainConfig, out)
    assert again == cfg and again.amp.precision == "fp32"


# ---------------------------------------------------------------------------------------------- parse_cli
def test_parse_cli_default_and_other_config(tmp_path, monkeypatch):
    default = write_yaml(tmp_path / "stage", "seed: 3\n")
    other = write_yaml(tmp_path / "exp", "seed: 9\noutput_dir: o\n")
    monkeypatch.chdir(tmp_path)
    assert parse_cli(CoarseTrainConfig, default, []).seed == 3
    cfg = parse_cli(CoarseTrainConfig, default, ["config=exp/config.yaml", "optim.lr=2e-3", "fold=2"])
    assert (cfg.seed, cfg.optim.lr, cfg.fold) == (9, 2e-3, 2)
    assert cfg.output_dir == str(tmp_path / "exp" / "o")
    assert other.exists()
    with pytest.raises(ConfigError, match="optim.lrr"):
        parse_cli(CoarseTrainConfig, default, ["optim.lrr=1"])


def test_parse_cli_help(tmp_path, capsys):
    with pytest.raises(HelpRequested) as info:
        parse_cli(CoarseTrainConfig, write_yaml(tmp_path, ""), ["--help"])
    assert "optim.lr" in info.value.text and "keys and schema defaults" in info.value.text
    from coarse_base_seg.train import cli as coarse_cli
    from data_prepare.run import cli as prepare_cli

    for cli in (coarse_cli, prepare_cli):
        assert cli(["-h"]) == 0 and "default config file" in capsys.readouterr().out


def test_input_size_too_small_for_the_network_depth_is_refused():
    from common.config import CoarseTrainConfig, FineTrainConfig
    from common.core.typed_config import ConfigError, load_config

    root = Path(__file__).resolve().parents[1]
    for schema, stage in ((CoarseTrainConfig, "coarse_base_seg"), (FineTrainConfig, "fine_efficient_seg")):
        with pytest.raises(ConfigError, match=r"data\.size_zyx: \[16, 16, 16\] leaves a bottleneck of \[1, 1, 1\]"):
            load_config(schema, root / stage / "config.yaml", ["data.size_zyx=[16,16,16]"])
        load_config(schema, root / stage / "config.yaml", ["data.size_zyx=[32,32,48]"])


# ---------------------------------------------------------------------------------------------- issue 21
def _alias_bomb(levels: int) -> str:
    """YAML whose `data.hu_window` expands to 9**levels values through nested aliases (a billion laughs)."""
    lines = ["bomb0: &b0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"bomb{i}: &b{i} [*b{i - 1}, *b{i - 1}, *b{i - 1}, *b{i - 1}, *b{i - 1}, *b{i - 1}, *b{i - 1}, "
              f"*b{i - 1}, *b{i - 1}]" for i in range(1, levels)]
    return "x-anchors:\n" + "".join(f"  {line}\n" for line in lines) + f"data:\n  hu_window: *b{levels - 1}\n"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """A 9-level anchor bomb used to take minutes and end in a MemoryError inside the error message, which printed the
    expanded value: it is refused at once, naming the file, and nothing of the value is shown."""
    path = write_yaml(tmp_path, _alias_bomb(9))
    err = load_error(CoarseTrainConfig, path)
    assert str(path) in str(err) and "aliases" in str(err) and len(str(err)) < 500
    err = load_error(CoarseTrainConfig, write_yaml(tmp_path, ""), [f"data.hu_window={'[' * 200}"])
    assert len(str(err)) < 1000


def test_anchors_aliases_and_merge_keys_are_ordinary_yaml(tmp_path):
    text = ("optim: &adam\n  lr: 1.0e-3\n  weight_decay: 0.0\ncps:\n  <<: {weight: 0.5}\n  rampup_iterations: 2\n"
            "data:\n  hu_window: &w [-300.0, 300.0]\n")
    cfg = load_config(FineTrainConfig, write_yaml(tmp_path, text))
    assert (cfg.cps.weight, cfg.cps.rampup_iterations, cfg.optim.lr) == (0.5, 2, 1.0e-3)
    err = load_error(FineTrainConfig, write_yaml(tmp_path, "cps:\n  <<: {weight: 0.5}\n  weight: 1.0\n  weight: 2.0\n"))
    assert "duplicate key 'weight'" in str(err)


@pytest.mark.parametrize("schema, yaml_text, key", [
    (CoarseTrainConfig, "data:\n  size_zyx: [100000, 100000, 100000]\n", "data.size_zyx"),
    (PrepareConfig, "fine_size_zyx: [4096, 4096, 4096]\n", "fine_size_zyx[0]"),
    (PrepareConfig, "coarse_size_zyx: [160, 160, 100000]\n", "coarse_size_zyx[2]"),
    (CoarseTrainConfig, "model:\n  channels: [16, 32, 64, 128, 1000000]\n", "model.channels[4]"),
    (CoarseTrainConfig, "data:\n  labeled_batch_size: 100000\n", "data.labeled_batch_size"),
    (CoarseTrainConfig, "data:\n  num_workers: 100000\n", "data.num_workers"),
    (PrepareConfig, "num_workers: 100000\n", "num_workers"),
    (FineTrainConfig, "crop:\n  extend_size_mm: 1.0e+9\n  max_extend_size_mm: 2.0e+9\n", "crop.extend_size_mm"),
    (PrepareConfig, "extend_size_mm: .inf\nmax_extend_size_mm: .inf\n", "extend_size_mm"),
    (FineTrainConfig, "postprocess:\n  min_volume_mm3: .inf\n", "postprocess.min_volume_mm3"),
    (CoarseTrainConfig, "postprocess:\n  z_window_mm: .nan\n", "postprocess.z_window_mm"),
    (CoarseTrainConfig, "optim:\n  lr: .inf\n", "optim.lr"),
    (CoarseTrainConfig, "schedule:\n  iterations: 1000000000000\n", "schedule.iterations"),
    (FineTrainConfig, "uif:\n  snapshots: 1000000\n", "uif.snapshots"),
    (CoarseTrainConfig, "data:\n  hu_window: [-1.0e+30, 1.0e+30]\n", "data.hu_window[0]"),
])
def test_sizes_and_numbers_without_an_upper_bound_are_config_errors(tmp_path, schema, yaml_text, key):
    """Values that used to reach the allocator (a traceback per case or an hour of swapping) or silently empty every
    mask (an infinite minimum volume) are refused at start-up, naming the key."""
    err = load_error(schema, write_yaml(tmp_path, yaml_text))
    assert key in err.keys, str(err)


def test_an_empty_config_file_warns_and_a_folder_is_named_as_one(tmp_path, caplog):
    caplog.set_level("WARNING")
    load_config(CoarseTrainConfig, write_yaml(tmp_path, "# nothing but a comment\n"))
    assert "config.yaml is empty: every key takes its default" in caplog.text
    err = load_error(CoarseTrainConfig, tmp_path)
    assert f"{tmp_path}: is a folder, not a config file" in str(err)
