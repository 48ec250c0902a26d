"""Each training setting is defined once (``isle_fast.training.config``): ``isle train`` and
``isle_fast.train`` take the same settings, with the same names, defaults and checks."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from isle_fast.errors import InputError
from isle_fast.options import namespace_options, settings_fields
from isle_fast.training.config import RunOptions, TrainConfig, config_from_dict, options_from_kwargs

#: the flags ``isle train`` had before the options were derived from TrainConfig (scripts use them)
FLAGS = {
    "--images",
    "--labels",
    "--val-images",
    "--val-gt",
    "--out",
    "--crop",
    "--scale",
    "--no-flip",
    "--fg-crop",
    "--workers",
    "--window",
    "--backbone",
    "--weights",
    "--output-stride",
    "--head-channels",
    "--steps",
    "--batch-size",
    "--accum",
    "--optimizer",
    "--lr",
    "--backbone-lr-mult",
    "--momentum",
    "--weight-decay",
    "--power",
    "--amp",
    "--no-amp",
    "--seed",
    "--deterministic",
    "--device",
    "--threads",
    "--val-every",
    "--ckpt-every",
    "--log-every",
    "--resume",
    "--overwrite",
    "--stop-after",
    "--quiet",
}


def _parser() -> argparse.ArgumentParser:
    from isle_fast.commands.train import add_arguments as add_train_arguments

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p


def test_the_command_keeps_every_flag():
    flags = {s for a in _parser()._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == FLAGS


def test_command_line_and_python_defaults_are_one():
    args = _parser().parse_args(["--images", "i", "--labels", "l", "--out", "o"])
    cfg, run = options_from_kwargs(namespace_options(args, TrainConfig, RunOptions))
    assert cfg == TrainConfig(images="i", labels="l")
    assert run == RunOptions(out="o")
    assert cfg.scale_range == (0.5, 2.0) and cfg.num_workers == 2 and cfg.weights == "imagenet" and cfg.flip


def test_command_line_and_python_give_the_same_config():
    argv = [
        "--images",
        "i",
        "--labels",
        "l",
        "--out",
        "o",
        "--scale",
        "0.5",
        "1",
        "--no-flip",
        "--workers",
        "0",
        "--weights",
        "NONE",
        "--no-amp",
        "--backbone",
        "resnet18",
        "--steps",
        "7",
        "--threads",
        "1",
        "--deterministic",
        "--stop-after",
        "3",
        "--quiet",
    ]
    cli = options_from_kwargs(namespace_options(_parser().parse_args(argv), TrainConfig, RunOptions))
    api = options_from_kwargs(
        dict(
            images="i",
            labels="l",
            out="o",
            scale_range=(0.5, 1),
            flip=False,
            num_workers=0,
            weights=None,
            amp=False,
            backbone="resnet18",
            steps=7,
            threads=1,
            deterministic=True,
            stop_after=3,
            quiet=True,
        )
    )
    assert cli == api


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "lamb"}, "--optimizer must be one of sgd, adamw"),
        ({"backbone": "resnet9"}, "--backbone must be one of"),
        ({"output_stride": 4}, "--output-stride must be one of 8, 16, 32"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"batch_size": 1}, "--batch-size must be at least 2, not 1: BatchNorm"),
        ({"crop": 8}, "--crop must be at least 16"),
        ({"threads": 0}, "--threads must be at least 1"),
        ({"fg_crop": 2.0}, "--fg-crop must be in"),
        ({"num_workers": -1}, "--workers must be at least 0"),
        ({"val_images": "v"}, "--val-images and --val-gt go together"),
        ({"steps": "many"}, "--steps must be a whole number"),
        ({"epochs": 3}, "unknown setting epochs"),
    ],
)
def test_bad_settings_are_named_by_their_flag(kwargs, match):
    from isle_fast.options import cli_flags

    with pytest.raises(InputError) as info:
        options_from_kwargs({"images": "i", "labels": "l", "out": "o", **kwargs})
    # the command line names the flag, a Python caller the parameter
    assert re.search(match, info.value.for_cli(cli_flags())), info.value.for_cli(cli_flags())
    assert "--" not in str(info.value)
    name = next(iter(kwargs))
    assert str(info.value).startswith(name) or name == "epochs"


def test_every_setting_is_documented_in_train():
    from isle_fast.training.train import train

    for f in settings_fields(TrainConfig) + settings_fields(RunOptions):
        if f.name not in ("images", "labels", "out"):
            assert f"    {f.name} : " in train.__doc__, f.name


def test_stored_configs_of_earlier_runs_read_with_todays_keys():
    old = {
        k: v
        for k, v in dataclasses.asdict(TrainConfig(images="i", labels="l")).items()
        if k not in ("scale_range", "fg_crop")
    }
    old.update(scale_min=0.6, scale_max=1.5)
    d = config_from_dict(old)
    assert d["scale_range"] == (0.6, 1.5) and "scale_min" not in d and d["fg_crop"] == 0.0
    assert TrainConfig(**d).scale_range == (0.6, 1.5)
