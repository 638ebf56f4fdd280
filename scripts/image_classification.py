#!/usr/bin/env python
"""Train a small ViT (patch Conv2d + Linear) or ResNet (Conv2d + BatchNorm) from a config on scikit-learn's
real 8x8 handwritten digits with hf_qn optimizers against AdamW/SGD; reports accuracy.

    python scripts/image_classification.py --model_type vit --output_dir model_cards/image-classification-vit
    python scripts/image_classification.py --model_type resnet --output_dir model_cards/image-classification-resnet
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_utils import RecipeArguments, accuracy_metrics, lora_model_init, run_comparison

from hf_qn.integrations.trainer import QNTrainingArguments

logger = logging.getLogger("image_classification")


@dataclass
class ModelArguments:
    model_type: str = field(default="vit", metadata={"help": "vit | resnet"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Start from a checkpoint instead."})
    hidden_size: int = field(default=64)


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub image dataset (image, label)."})
    test_fraction: float = field(default=0.2)


def load_digits_split(seed: int, fraction: float, smoke: bool):
    from datasets import Dataset
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (torch.tensor(d.images, dtype=torch.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8), real digits
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    if smoke:
        perm = perm[:128]
    n_test = int(len(perm) * fraction)
    test_idx, train_idx = perm[:n_test], perm[n_test:]

    def ds(idx):
        return Dataset.from_dict({"pixel_values": x[idx].tolist(), "labels": y[idx].tolist()}).with_format("torch")

    return ds(train_idx), ds(test_idx)


def vit_config(hidden_size: int) -> Any:
    """The recipe's ViT: 8 x 8 one-channel images in 2 x 2 patches, 2 layers of ``hidden_size``, 10 classes."""
    from transformers import ViTConfig

    return ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden_size, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=2 * hidden_size, num_labels=10)


def main(argv: list[str] | None = None) -> dict:
    from transformers import (
        AutoModelForImageClassification,
        HfArgumentParser,
        ResNetConfig,
        ResNetForImageClassification,
        ViTForImageClassification,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, QNTrainingArguments))
    model_args, data_args, recipe, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.dataset_name:
        raise NotImplementedError("Hub image datasets: preprocess to (pixel_values, labels) and pass --train_file")
    train, test = load_digits_split(training_args.seed, data_args.test_fraction, recipe.smoke)
    h = 16 if recipe.smoke else model_args.hidden_size
    if model_args.model_type == "vit":
        config = vit_config(h)
        cls = ViTForImageClassification
    elif model_args.model_type == "resnet":
        config = ResNetConfig(num_channels=1, embedding_size=h // 2, hidden_sizes=[h // 2, h], depths=[1, 1],
                              layer_type="basic", num_labels=10, downsample_in_first_stage=False)
        cls = ResNetForImageClassification
    else:
        raise ValueError(f"Invalid --model_type {model_args.model_type!r} (vit or resnet)")

    def model_init():
        if model_args.model_name_or_path:
            return AutoModelForImageClassification.from_pretrained(model_args.model_name_or_path, num_labels=10,
                                                                   ignore_mismatched_sizes=True)
        return cls(config)

    return run_comparison(
        task_name=f"image-classification-{model_args.model_type}",
        recipe=recipe,
        training_args=training_args,
        model_init=lora_model_init(model_init, recipe, task_type=None, modules_to_save=["classifier"]),
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=accuracy_metrics,
        metric_name="accuracy",
        greater_is_better=True,
        default_lrs={"adamw": 3e-3, "sgd": 0.05, "kbfgs": 3e-3, "kbfgs_l": 3e-3, "mlbfgs": 1e-3},
        dataset_id=("digits (scikit-learn, UCI)", "digits"),
        task_id=("image-classification", "Image classification"),
        base_model=model_args.model_name_or_path,
    )


if __name__ == "__main__":
    main()
