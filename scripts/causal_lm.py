#!/usr/bin/env python
"""Train a small GPT-2 (transformers' Conv1D layers, tied embeddings) or, with ``--model_type llama``, a Llama of
the same width, depth and heads (SwiGLU, rotary positions, an untied head) with hf_qn optimizers against AdamW.

Default data: gensim's Lee news corpus (300 real articles), a byte-level BPE tokenizer trained in-process
on the training articles, blocks of ``--block_size`` tokens, the last 10 % of articles held out; reports
perplexity. ``--model_name_or_path`` / ``--dataset_name`` / ``--train_file`` for users with the Hub or their
own text. Runs offline and unchanged under ``torchrun`` / ``accelerate launch``.

    python scripts/causal_lm.py --output_dir model_cards/causal-lm-gpt2-lee
    python scripts/causal_lm.py --model_type llama --output_dir model_cards/causal-lm-llama-lee
    python scripts/causal_lm.py --vocab_size 50257 --n_embd 768 --n_layer 12 --n_head 12 --bf16 ...  # GPT-2 small
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_utils import RecipeArguments, llama_config, lora_model_init, perplexity, run_comparison

from hf_qn.integrations.trainer import QNTrainingArguments
from hf_qn.optim.kbfgs import DEFAULT_LR, pretraining_lr

logger = logging.getLogger("causal_lm")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Start from a checkpoint instead."})
    model_type: str = field(default="gpt2", metadata={
        "help": "Model built from a config: gpt2 (Conv1D layers, tied embeddings) or llama (RMSNorm, rotary "
                "positions, SwiGLU, separate q/k/v, an untied head) of the same width, depth and heads; "
                "--model_name_or_path loads its own."})
    vocab_size: int = field(default=2000, metadata={
        "help": "The model's vocabulary size; the BPE tokenizer is trained up to it. A small corpus yields fewer "
                "tokens: the embedding keeps this many rows anyway (50257 gives GPT-2 small's 124M parameters)."})
    n_embd: int = field(default=128)
    n_layer: int = field(default=2)
    n_head: int = field(default=4)
    n_positions: int | None = field(default=None, metadata={"help": "Position embeddings (default max(128, "
                                                                     "block_size); GPT-2 small has 1024)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset with a text column."})
    train_file: str | None = field(default=None, metadata={"help": "A local text file, one document a line."})
    block_size: int = field(default=64)
    eval_fraction: float = field(default=0.1)


def load_lee() -> list[str]:
    from importlib.resources import files

    path = files("gensim") / "test" / "test_data" / "lee_background.cor"
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def load_documents(data: DataArguments) -> list[str]:
    if data.dataset_name:
        from datasets import load_dataset

        return [t for t in load_dataset(data.dataset_name, split="train")["text"] if t.strip()]
    if data.train_file:
        with open(data.train_file, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return load_lee()


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def blocks(texts: list[str], tokenizer, block_size: int):
    from datasets import Dataset

    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // block_size
    chunks = [ids[i * block_size : (i + 1) * block_size] for i in range(n)]
    return Dataset.from_dict({"input_ids": chunks, "labels": chunks})


def main(argv: list[str] | None = None) -> dict:
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        HfArgumentParser,
        LlamaForCausalLM,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, QNTrainingArguments))
    model_args, data_args, recipe, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.model_type not in ("gpt2", "llama"):
        raise ValueError(f"Invalid --model_type {model_args.model_type!r}: gpt2 or llama")
    docs = load_documents(data_args)
    if recipe.smoke:
        docs = docs[:40]
    n_eval = max(1, int(len(docs) * data_args.eval_fraction))
    train_docs, eval_docs = docs[:-n_eval], docs[-n_eval:]
    if model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = train_tokenizer(train_docs, 300 if recipe.smoke else model_args.vocab_size)
    train, test = (blocks(d, tokenizer, data_args.block_size) for d in (train_docs, eval_docs))
    logger.info("%d train / %d eval blocks of %d tokens, vocabulary %d", len(train), len(test),
                data_args.block_size, len(tokenizer))
    vocab = len(tokenizer) if recipe.smoke or model_args.model_name_or_path else max(len(tokenizer),
                                                                                      model_args.vocab_size)
    shape = (32, 1, 2) if recipe.smoke else (model_args.n_embd, model_args.n_layer, model_args.n_head)
    positions = model_args.n_positions or max(128, data_args.block_size)
    if model_args.model_type == "llama":
        config = llama_config(vocab, *shape, n_positions=positions, token_id=tokenizer.eos_token_id)
    else:
        n_embd, n_layer, n_head = shape
        config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            tie_word_embeddings=True)

    def model_init():
        if model_args.model_name_or_path:
            return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
        model = (LlamaForCausalLM if model_args.model_type == "llama" else GPT2LMHeadModel)(config)
        logger.info("%s from config: %.1fM parameters", type(model).__name__,
                    sum(p.numel() for p in model.parameters()) / 1e6)
        return model

    return run_comparison(
        task_name="causal-lm" if model_args.model_name_or_path else f"causal-lm-{model_args.model_type}",
        recipe=recipe,
        training_args=training_args,
        model_init=lora_model_init(model_init, recipe, task_type="CAUSAL_LM"),
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=None,
        metric_name="perplexity",
        greater_is_better=False,
        # K-BFGS's: the library's own default for the model (pretraining or fine-tuning)
        default_lrs={"adamw": 1e-3, "sgd": 0.1, "kbfgs_l": DEFAULT_LR, "mlbfgs": 3e-4,
                     "kbfgs": DEFAULT_LR if model_args.model_name_or_path else pretraining_lr(shape[0])},
        dataset_id=(data_args.dataset_name or "lee_background (gensim test data)", "lee_background"),
        task_id=("text-generation", "Causal language modelling"),
        base_model=model_args.model_name_or_path,
        extra_metrics=perplexity,
        tokenizer=tokenizer,
    )


if __name__ == "__main__":
    main()
