"""``isle train --images IMG --labels LABELS --out RUN``: train DeepLabV3+ (ISLE step 4).

The options are the fields of :class:`isle_fast.training.config.TrainConfig` and
:class:`~isle_fast.training.config.RunOptions`, the same settings as :func:`isle_fast.train`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from isle_fast.options import add_arguments as add_settings
    from isle_fast.training.config import RunOptions, TrainConfig

    add_settings(parser, TrainConfig, RunOptions)


def run(args: argparse.Namespace) -> int:
    from isle_fast.options import namespace_options
    from isle_fast.training.config import RunOptions, TrainConfig
    from isle_fast.training.train import train

    train(**namespace_options(args, TrainConfig, RunOptions))
    return 0
