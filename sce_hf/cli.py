"""Command-line flags shared by the scripts, defined once (the transformers examples' names), and YAML recipes.

A recipe (`--config training/configs/NAME.yaml`) sets defaults; flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import yaml


def add_data_args(parser: argparse.ArgumentParser, *, gallery: bool = False) -> None:
    """Data source, columns, splits and sample limits."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None,
                       help="A Hub dataset id, a folder written by `Dataset.save_to_disk`, a parquet/arrow/csv/json "
                       "file or a folder of parquet files, or `fashion_mnist` "
                       "(read from the Debian package's files when the Hub is unreachable).")
    group.add_argument("--dataset_config_name", type=str, default=None, help="The Hub dataset's configuration.")
    group.add_argument("--train_dir", type=str, default=None,
                       help="A folder of images (sub-folders become labels) instead of --dataset_name.")
    group.add_argument("--image_column_name", type=str, default=None,
                       help="Column holding the images (default: the first of image, img).")
    group.add_argument("--label_column_name", type=str, default=None,
                       help="Column holding integer labels (default: label, labels, fine_label).")
    group.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` caches downloads.")
    if gallery:
        group.add_argument("--split", type=str, default="test", help="The split to use as the gallery.")
        group.add_argument("--max_images", type=int, default=None, help="Use only the first N images.")
        return
    group.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    group.add_argument("--train_split", type=str, default="train", help="The split to train on (or the k-NN bank).")
    group.add_argument("--eval_split", type=str, default=None, help="A labelled split to evaluate on (e.g. test).")
    group.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training samples.")
    group.add_argument("--max_eval_samples", type=int, default=None, help="Use only the first N evaluation samples.")


def add_hub_args(parser: argparse.ArgumentParser, *, push_flag: bool = True) -> None:
    """Pushing to the Hugging Face Hub (`push_flag`: offer `--push_to_hub`, for scripts whose push is optional)."""
    group = parser.add_argument_group("hub")
    if push_flag:
        group.add_argument("--push_to_hub", action="store_true", help="Upload the exported model to the Hub.")
    group.add_argument("--hub_model_id", type=str, default=None, help="ORG/NAME of the Hub repository.")
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one).")
    group.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=str, default=None,
                        help="A YAML recipe (training/configs/NAME.yaml) whose values become defaults; flags override.")


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with the values of `--config` as defaults.

    Raises:
        SystemExit: (through `parser.error`) for a missing recipe file or a key the script does not know.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        if not os.path.isfile(known.config):
            parser.error(f"--config {known.config}: no such file (recipes live in training/configs/).")
        with open(known.config) as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            parser.error(f"--config {known.config} must hold a mapping of flag names to values.")
        valid = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - valid)
        if unknown:
            parser.error(f"--config {known.config}: unknown keys {unknown}; each key must be a flag of this script.")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


__all__ = ["add_config_arg", "add_data_args", "add_hub_args", "parse_args_with_config"]
