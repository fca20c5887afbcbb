"""Settings written by earlier releases keep working: a `train_config.yaml` saved by 0.1.0 (the release before the
command line and settings were reorganised) loads and resolves to the same settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from phi3v_tune.cli import build_parser
from phi3v_tune.config import FIELDS, TrainConfig, load_yaml, resolve

SAVED = Path(__file__).parent / "data" / "train_config_0.1.0.yaml"


def test_a_saved_train_config_of_release_0_1_0_resolves_to_the_same_settings(tmp_path):
    saved = yaml.safe_load(SAVED.read_text())
    assert set(saved) <= set(FIELDS), set(saved) - set(FIELDS)  # no setting of that release was renamed or dropped
    cfg = resolve(argparse.Namespace(config=str(SAVED), task=None))
    for key, value in saved.items():
        assert getattr(cfg, key) == value, key
    # through the command line too, and saved again it reads back the same
    args = build_parser().parse_args(["train", "--config", str(SAVED)])
    again = resolve(args)
    assert again.to_dict() == cfg.to_dict()
    again.save(tmp_path / "train_config.yaml")
    assert {k: v for k, v in load_yaml(tmp_path / "train_config.yaml").items() if k in saved} == saved


def test_flags_override_a_saved_config():
    args = build_parser().parse_args(["train", "--config", str(SAVED), "--lr", "3e-4", "--lora-rank", "8"])
    cfg = resolve(args)
    assert (cfg.learning_rate, cfg.lora_rank, cfg.method) == (3e-4, 8, "lora")
    assert isinstance(cfg, TrainConfig)
