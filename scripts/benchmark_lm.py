#!/usr/bin/env python
"""Causal language modelling on real Wikipedia text: hf_qn against tuned AdamW, Muon and SOAP at equal time.

Data: the Wikipedia excerpt shipped in gensim's test data (106 articles, about 3 MB of text after the markup
is stripped by gensim's own ``filter_wiki``); every 10th article is held out whole for validation. With
``--text_files`` the same benchmark runs on your own plain text instead: documents are its blank-line-separated
blocks, every 10th held out whole. A byte-level BPE tokenizer is trained on the training documents only.
Model: GPT-2 built from a config (tied embeddings, transformers' Conv1D layers, no dropout), ``--size small``
(4 layers of width 128, about 1.3M parameters at a 4096 vocabulary), ``large`` (6 layers of width 256, about
5.8M) or, for a GPU, ``gpt2`` (GPT-2 small's 12 layers of width 768: 124M parameters at ``--vocab_size 50257``).
``--arch llama`` builds a Llama-architecture model of the same width, depth and heads instead (RMSNorm, rotary
positions, a SwiGLU MLP, separate q/k/v projections, no biases, an untied LM head).
On a CUDA device (``--device auto`` takes one where present) the step clock is read after
``torch.cuda.synchronize()``, the forward passes run under bf16 autocast (``--autocast auto``), and each optimizer's
peak memory is measured alone for ``--memory_steps`` steps before the final runs.

How the comparison is kept fair:

* all runs live in one process and take turns in slices of ``--slice_seconds`` of training, so that a change
  of machine load hits every optimizer alike; each is charged only its own training time (evaluation and the
  other runs' turns are off its clock);
* every run of a seed starts from the same initial weights and sees the same batches in the same order;
* each optimizer's learning rate is swept (the candidates interleaved the same way, ``--sweep_seconds``
  each, long enough to leave the warm-up); when the best candidate is at an end of the grid, the grid is
  extended past it until the optimum is interior, each extension run beside a re-run of the end it extends, so that
  the two are compared under the same machine load;
* Muon's rows train what Muon does not take (embeddings, the head, norms, biases) with AdamW at Muon's own lr,
  so its sweep tunes both parts (the recipes' convention); at AdamW's tuned lr there, as before 2026-12-04, Muon
  ended 0.1 nats higher on the small GPT-2 (``muon:adamw_lr=VALUE`` still sets it apart);
* all use the same linear warm-up (``--warmup_steps``), then a constant learning rate (or, with
  ``--lr_schedule cosine`` or ``linear``, the Trainer's default, a decay to zero over each run's own budget of
  training seconds, as a decaying schedule would end at that budget), and no weight decay.

Outputs in ``--output_dir``: ``results.json`` (every evaluation of every run), ``results.md`` (the table),
``loss_curves.png`` (validation loss against seconds and against steps) and a model card ``README.md``.

    python scripts/benchmark_lm.py --output_dir model_cards/lm-gpt2-wikipedia
    python scripts/benchmark_lm.py --size large --output_dir model_cards/lm-gpt2-wikipedia-large
    python scripts/benchmark_lm.py --optimizers adamw kbfgs --lr adamw=1e-3 kbfgs=1e-3 --budget 30
    python scripts/benchmark_lm.py --text_files my_text.txt.gz --optimizers adamw muon_fp32 kbfgs --output_dir /tmp/t
    python scripts/benchmark_lm.py --optimizers muon muon:lr=2e-3 muon:lr=5e-3 --lr adamw=3e-3 muon=3e-3 \
        --sweep_seconds 0 --seeds 0 1     # an lr screen: each NAME:lr=VALUE is a row at that lr
    python scripts/benchmark_lm.py --size gpt2 --vocab_size 50257 --block_size 512 --optimizers adamw muon kbfgs \
        --output_dir /tmp/gpu      # GPT-2 small on a GPU
"""

from __future__ import annotations

import bz2
import dataclasses
import gc
import gzip
import json
import logging
import lzma
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_autoencoder import kbfgs_step
from muon_with_adamw import MuonFactory
from recipe_utils import llama_config, lr_beyond, optimizer_state_bytes, resolved_output_side, sync_cuda

logger = logging.getLogger("benchmark_lm")

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: n_embd, n_layer, n_head; gpt2 is GPT-2 small's shape
SIZES = {"tiny": (32, 1, 2), "small": (128, 4, 4), "large": (256, 6, 8), "gpt2": (768, 12, 12)}
AUTOCAST = {"auto": None, "none": None, "bfloat16": torch.bfloat16}  # auto: resolved by resolve_device

#: the optimizers this benchmark knows: constructor keyword arguments of the hf_qn rows, and the peers.
KBFGS_VARIANTS: dict[str, dict[str, Any]] = {
    "kbfgs": {},  # KBFGS(model) with its defaults: what a user gets untuned
    "kbfgs_paper": {"preset": "paper"},  # the K-BFGS paper's setting: same-batch pairs, no grafting
    "kbfgs_paper_int10": {"preset": "paper", "update_interval": 10},
}
PEERS = ("adamw", "muon", "muon_fp32", "soap", "mlbfgs")
ALL_OPTIMIZERS = [*PEERS, *KBFGS_VARIANTS]
DEFAULT_OPTIMIZERS = ["adamw", "muon", "muon_fp32", "soap", "mlbfgs", "kbfgs", "kbfgs_paper_int10"]

#: initial lr grids (extended past an end that wins); Muon's lr is its own (spectral) scale. A variant written
#: ``kbfgs:name=value,...`` (the fields of KBFGSConfig and of LayerPolicy) or
#: ``mlbfgs:...`` sweeps the grid of its kind.
SWEEPS: dict[str, list[float]] = {
    "adamw": [3e-4, 1e-3, 3e-3],
    "muon": [0.01, 0.03, 0.1],
    "muon_fp32": [0.01, 0.03, 0.1],
    "soap": [1e-3, 3e-3, 1e-2],
    "mlbfgs": [1e-4, 3e-4, 1e-3],
    "mlbfgs_unit": [0.03, 0.1, 0.3],  # mlbfgs:normalize=unit,...: lr is the step length (official runs: 0.1)
    # grafted to Adam's step length: AdamW's scale; centred on K-BFGS's default for a language model trained from
    # scratch (hf_qn.optim.kbfgs.pretraining_lr), which every model here is: 6e-3 at the small size, scaled to
    # the width of the others by sweep_grid
    "kbfgs": [2e-3, 6e-3, 2e-2],
    "kbfgs_paper": [0.03, 0.1, 0.3],
    "kbfgs_paper_int10": [0.03, 0.1, 0.3],
}


#: the lr after the warm-up, as a factor of the base lr, at a fraction of the run's budget of training seconds
LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda frac: 1.0,
    "cosine": lambda frac: 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))),
    "linear": lambda frac: max(0.0, 1.0 - frac),  # the Trainer's default lr_scheduler_type
}


@dataclass
class LMBenchmarkArguments:
    """Command-line options (parsed by ``transformers.HfArgumentParser``)."""

    output_dir: str = field(default="outputs/lm", metadata={"help": "Where results, plot and card go."})
    size: str = field(default="small", metadata={"help": f"Model size: one of {list(SIZES)}."})
    arch: str = field(default="gpt2", metadata={
        "help": "Model family: gpt2 or llama (RMSNorm, rotary positions, SwiGLU, separate q/k/v, an untied head; "
                "the same width, depth and heads as gpt2's --size)."})
    optimizers: list[str] = field(default_factory=lambda: list(DEFAULT_OPTIMIZERS), metadata={
        "help": f"Any of {ALL_OPTIMIZERS}; kbfgs:k=v,... and mlbfgs:k=v,... are variants (config fields); "
                "NAME:lr=VALUE is a row at that lr, not swept (an lr screen: muon:lr=0.002 muon:lr=0.005); AdamW's "
                "and Muon's rows also take betas=(B1,B2) (Muon's for its AdamW part), Muon's adamw_lr=VALUE."})
    budget: float = field(default=120.0, metadata={"help": "Training seconds of every final run."})
    sweep_seconds: float = field(default=30.0, metadata={"help": "Training seconds of every lr candidate."})
    lr: list[str] = field(default_factory=list, metadata={
        "help": "Fixed learning rates as NAME=VALUE (that optimizer is not swept), e.g. adamw=1e-3; a variant "
                "(kbfgs:k=v) takes its base's (kbfgs=...) unless given its own (kbfgs:k=v=...) or its lr is on "
                "another scale (graft=none)."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={
        "help": "One final run per optimizer and seed (initial weights and batch order); sweeps use the first."})
    slice_seconds: float = field(default=1.0, metadata={"help": "Training seconds of one turn of a run."})
    eval_every: float = field(default=5.0, metadata={"help": "Training seconds between validation evaluations."})
    vocab_size: int = field(default=4096)
    block_size: int = field(default=128)
    batch_size: int = field(default=16)
    warmup_steps: int = field(default=20, metadata={"help": "Linear lr warm-up of every optimizer."})
    lr_schedule: str = field(default="constant", metadata={
        "help": f"After the warm-up: one of {list(LR_SCHEDULES)}; cosine and linear (the Trainer's default) "
                "decay every run's lr to zero over its own budget of training seconds (the sweep's candidates over "
                "--sweep_seconds)."})
    val_blocks: int = field(default=64, metadata={"help": "Validation blocks evaluated (from held-out articles)."})
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads."})
    device: str = field(default="auto", metadata={
        "help": "Where the models train: auto (CUDA where present, else the CPU), cpu, cuda or cuda:N."})
    autocast: str = field(default="auto", metadata={
        "help": f"Forward passes under torch.autocast: one of {list(AUTOCAST)}; auto is bfloat16 on a CUDA device "
                "that has it, none on a CPU (weights and optimizer states stay float32)."})
    memory_steps: int = field(default=10, metadata={
        "help": "On a CUDA device, steps of each optimizer alone, before the final runs, whose peak memory (model, "
                "optimizer state, activations) the table reports; 0: not measured."})
    text_files: list[str] = field(default_factory=list, metadata={
        "help": "Train on these plain-text files (UTF-8; .gz, .bz2 or .xz compressed also read) instead of the "
                "Wikipedia excerpt: documents are their blank-line-separated blocks, every 10th held out whole "
                "for validation."})
    max_articles: int | None = field(default=None, metadata={
        "help": "Use only this many articles (or documents of --text_files): for tests."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the card (needs the Hub)."})
    hub_model_id: str | None = field(default=None, metadata={
        "help": "Hub repository of --push_to_hub. (default: hf-qn/lm-<arch>-<corpus>[-<size>]-benchmark, the corpus "
                "named by the first of --text_files, or wikipedia)"})


# ------------------------------------------------------------------------------------------------ data
def load_wikipedia(max_articles: int | None = None) -> list[str]:
    """Plain text of the articles of gensim's Wikipedia excerpt (redirects dropped, markup stripped by gensim's
    ``filter_wiki``, bold/italic quotes and empty lines removed)."""
    from importlib.resources import files

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = files("gensim") / "test" / "test_data" / WIKI_FILE
    articles = []
    with bz2.BZ2File(str(path)) as f:
        for _title, text, _pageid in extract_pages(f):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            plain = re.sub(r"'{2,}", "", filter_wiki(text))
            plain = "\n".join(line.strip() for line in plain.splitlines() if line.strip())
            articles.append(plain)
            if max_articles and len(articles) >= max_articles:
                break
    return articles


def load_text_files(paths: list[str], max_documents: int | None = None) -> list[str]:
    """The documents of plain-text files, file after file: each blank-line-separated block, its lines stripped
    (blocks with no text dropped). ``.gz``, ``.bz2`` and ``.xz`` files are decompressed; bytes that are not UTF-8
    are replaced."""
    openers: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    documents = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--text_files: no file {path!r}")
        with openers.get(os.path.splitext(path)[1], open)(path, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        for block in re.split(r"\n[ \t\r\f\v]*\n", text):
            lines = [line.strip() for line in block.splitlines() if line.strip()]
            if lines:
                documents.append("\n".join(lines))
    return documents[:max_documents] if max_documents else documents


def corpus_name(args: LMBenchmarkArguments) -> str:
    """What the run trained on, for its log, plot and card."""
    if not args.text_files:
        return "Wikipedia (gensim excerpt)"
    return "text of " + ", ".join(os.path.basename(p) for p in args.text_files)


def default_hub_model_id(args: LMBenchmarkArguments) -> str:
    """``hf-qn/lm-<arch>-<corpus>[-<size>]-benchmark``: the corpus is ``wikipedia`` or the first text file's name
    without its extensions, the size is left out for the default ``small``."""
    corpus = "wikipedia"
    if args.text_files:
        stem = os.path.basename(args.text_files[0]).split(".")[0]
        corpus = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:48] or "text"
    size = "" if args.size == "small" else f"-{args.size}"
    return f"hf-qn/lm-{args.arch}-{corpus.lower()}{size}-benchmark"


def split_articles(articles: list[str]) -> tuple[list[str], list[str]]:
    """Every 10th article (whole) for validation, the rest for training."""
    return [a for i, a in enumerate(articles) if i % 10 != 9], [a for i, a in enumerate(articles) if i % 10 == 9]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (the ``tokenizers`` library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def to_blocks(texts: list[str], tokenizer: Any, block_size: int) -> Tensor:
    """The texts tokenized, joined with the end-of-text token, cut into rows of ``block_size`` tokens."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend([*enc.ids, eos])
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def batch_stream(blocks: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Batches of rows in a fresh seeded permutation every epoch (the same for every optimizer of a seed)."""
    gen = torch.Generator().manual_seed(seed + 1)
    while True:
        perm = torch.randperm(len(blocks), generator=gen).to(blocks.device)
        for b in range(len(blocks) // batch_size):
            yield blocks[perm[b * batch_size : (b + 1) * batch_size]]


def gpt2(size: str, vocab_size: int, block_size: int, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    n_embd, n_layer, n_head = SIZES[size]
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=0)  # <|endoftext|> is the first token
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def llama(size: str, vocab_size: int, block_size: int, seed: int) -> nn.Module:
    """A Llama-architecture model of the same width, depth and heads as ``gpt2``'s size (:func:`llama_config`)."""
    from transformers import LlamaForCausalLM

    config = llama_config(vocab_size, *SIZES[size], n_positions=block_size)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class Family(NamedTuple):
    """A model family of ``--arch``."""

    title: str  #: what the logs, plot and card call it
    build: Callable[[str, int, int, int], nn.Module]  #: (size, vocab_size, block_size, seed) -> the model


ARCHS = {"gpt2": Family("GPT-2", gpt2), "llama": Family("Llama", llama)}


def lm_loss(model: nn.Module, x: Tensor, autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Mean next-token cross-entropy in nats per token; the forward pass under autocast to ``autocast_dtype``
    (None: none)."""
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        return model(input_ids=x, labels=x).loss


def resolve_device(args: LMBenchmarkArguments) -> tuple[torch.device, torch.dtype | None]:
    """``--device`` and ``--autocast`` as a device and an autocast dtype (None: full precision)."""
    if args.autocast not in AUTOCAST:
        raise ValueError(f"Invalid --autocast {args.autocast!r}: one of {list(AUTOCAST)}")
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
    except RuntimeError as err:
        raise ValueError(f"Invalid --device {args.device!r}: auto, cpu, cuda or cuda:N ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Invalid --device {args.device!r}: auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here; use --device cpu (or auto)")
    if args.autocast == "auto":
        fast = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if fast else None
    return device, AUTOCAST[args.autocast]


# ------------------------------------------------------------------------------------------------ optimizers
#: what a peer's row takes after its colon (``adamw:betas=(0.9,0.95)``); every other peer takes only ``lr``
PEER_OPTIONS: dict[str, set[str]] = {"adamw": {"lr", "betas"}, "muon": {"lr", "adamw_lr", "betas"},
                                     "muon_fp32": {"lr", "adamw_lr", "betas"}}


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """``"kbfgs:graft=adam,update_interval=10"`` -> ``("kbfgs", {...})``; a named row -> its base and keywords.
    Every optimizer takes ``:lr=VALUE`` (``muon:lr=0.002``): a row at that lr, not swept; AdamW's and Muon's rows
    also take ``betas=(B1,B2)`` (Muon's: of its AdamW part), Muon's ``adamw_lr=VALUE``, the lr of its AdamW part
    (default: the row's own lr); the other peers take nothing else."""
    from hf_qn.integrations.trainer import parse_qn_args

    base, sep, extra = name.partition(":")
    if base not in ALL_OPTIMIZERS:
        raise ValueError(f"Invalid optimizer {name!r}: one of {ALL_OPTIMIZERS}, or kbfgs:k=v,... / mlbfgs:k=v,... "
                         "(any of them with :lr=VALUE)")
    kwargs = parse_qn_args(extra) if sep else {}
    allowed = PEER_OPTIONS.get(base, {"lr"})
    if base not in (*KBFGS_VARIANTS, "mlbfgs") and set(kwargs) - allowed:
        raise ValueError(f"Invalid optimizer {name!r}: {base} takes only {', '.join(sorted(allowed))}=VALUE after "
                         "the colon (keywords are for kbfgs:k=v,... / mlbfgs:k=v,...)")
    if "betas" in kwargs and not (isinstance(kwargs["betas"], tuple) and len(kwargs["betas"]) == 2):
        raise ValueError(f"Invalid optimizer {name!r}: betas must be two numbers in parentheses, betas=(0.9,0.95)")
    return base, {**KBFGS_VARIANTS.get(base, {}), **kwargs}


def variant_lr(name: str) -> float | None:
    """The lr a row's name fixes (``muon:lr=0.002`` -> 0.002), or None."""
    lr = split_variant(name)[1].get("lr")
    return None if lr is None else float(lr)


def sweep_grid(name: str, size: str = "small") -> list[float]:
    """The lrs a sweep of ``name`` starts from, at the model size ``size``: K-BFGS's grafted grid follows the
    library's default lr for the width (halved at the large size's 256)."""
    base, kwargs = split_variant(name)
    if base in KBFGS_VARIANTS and kwargs.get("preset") == "paper" and kwargs.get("graft") == "adam":
        return list(SWEEPS["kbfgs"])
    if base in KBFGS_VARIANTS and kwargs.get("graft") == "none":
        return list(SWEEPS["kbfgs_paper"])
    if base == "mlbfgs" and kwargs.get("normalize") == "unit":  # lr is the step's length, as the official code's
        return list(SWEEPS["mlbfgs_unit"])
    if base == "kbfgs":
        from hf_qn.optim.kbfgs import PRETRAINING_LR, pretraining_lr

        scale = pretraining_lr(SIZES[size][0]) / PRETRAINING_LR
        return [lr * scale for lr in SWEEPS["kbfgs"]]
    return list(SWEEPS[base])


def build_optimizer(name: str, model: nn.Module, lr: float) -> Any:
    """``name``'s optimizer over ``model`` at ``lr``. Muon's rows train the parameters Muon does not take
    (embeddings, the head, biases, norms) with AdamW at the same ``lr`` (its updates scaled to AdamW's RMS, so one lr
    serves both parts, as in the recipes), unless the row names another (``muon_fp32:adamw_lr=0.001``): with AdamW's
    tuned lr there, as the cards before 2026-12-04 ran it, Muon ended 0.1 nats higher on the small GPT-2."""
    import hf_qn

    name, kwargs = split_variant(name)
    lr = float(kwargs.pop("lr", lr))
    adam = {"betas": kwargs["betas"]} if "betas" in kwargs else {}  # else the optimizer's own default
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True, **adam)
    if name in ("muon", "muon_fp32"):
        return MuonFactory()(model, lr=lr, adamw_lr=float(kwargs.get("adamw_lr", lr)),
                             float32_newton_schulz=name == "muon_fp32", **adam)
    if name == "soap":
        import heavyball

        heavyball.utils.compile_mode = None  # eager: compiling on 2 CPU cores costs minutes
        return heavyball.SOAP(model.parameters(), lr=lr, weight_decay=0.0)
    if name == "mlbfgs":
        return hf_qn.MLBFGS(model, lr=lr, **kwargs)
    if name in KBFGS_VARIANTS:
        return hf_qn.KBFGSFactory()(model, **{"lr": lr, "l2": 0.0, **kwargs})  # policy fields split off as for a user
    raise ValueError(f"Unknown optimizer {name!r} (choose from {ALL_OPTIMIZERS})")


def check_optimizers(names: list[str], arch: str = "gpt2") -> None:
    """Build every optimizer of ``names`` over a tiny model of ``arch``, so that an unknown name, a bad variant
    (``kbfgs:damping=1.0``) or a missing peer library is refused before the text is tokenized and anything trains,
    with the optimizer's own message."""
    quiet = logging.getLogger("hf_qn")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the real runs log their resolved settings
    try:
        for name in names:
            split_variant(name)  # an unknown name: refused with the list of known ones
            try:
                build_optimizer(name, ARCHS[arch].build("tiny", 64, 8, 0), 1e-3)
            except Exception as err:
                raise ValueError(f"Invalid optimizer {name!r} in --optimizers: {type(err).__name__}: {err}") from err
    finally:
        quiet.setLevel(level)


def state_bytes(opt: Any, name: str) -> float:
    """:func:`optimizer_state_bytes` of a final run's optimizer; NaN (logged) where its ``state_dict`` fails: a peer's
    failure is a result to report, not a crash of the report."""
    try:
        return float(optimizer_state_bytes(opt))
    except Exception:
        logger.exception("%s: optimizer state not measured", name)
        return float("nan")


def make_step(model: nn.Module, opt: Any, autocast_dtype: torch.dtype | None = None) -> Callable[[Tensor], float]:
    """One training step of ``opt`` on a batch; returns the batch loss before the step."""
    import hf_qn

    def objective(x: Tensor) -> Tensor:
        return lm_loss(model, x, autocast_dtype)

    if isinstance(opt, hf_qn.KBFGS):
        return lambda x: kbfgs_step(opt, objective, x)

    def step(x: Tensor) -> float:
        opt.zero_grad()
        loss = objective(x)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


# ------------------------------------------------------------------------------------------------ runs
@torch.no_grad()
def evaluate(model: nn.Module, blocks: Tensor, batch_size: int, autocast_dtype: torch.dtype | None = None) -> float:
    model.eval()
    total = sum(float(lm_loss(model, blocks[i : i + batch_size], autocast_dtype)) * len(blocks[i : i + batch_size])
                for i in range(0, len(blocks), batch_size))
    model.train()
    return total / len(blocks)


class Run:
    """One optimizer at one lr and seed: its model, optimizer, batches and its own training clock."""

    def __init__(self, name: str, lr: float, seed: int, budget: float, data: dict[str, Any],
                 args: LMBenchmarkArguments) -> None:
        self.name, self.lr, self.seed, self.budget = name, lr, seed, budget
        self.device, self._autocast = data["device"], data["autocast"]
        self.model = ARCHS[args.arch].build(args.size, data["vocab_size"], args.block_size, seed).to(self.device)
        self.opt = build_optimizer(name, self.model, lr)
        warmup = max(1, args.warmup_steps)
        self._groups = [(g, g["lr"]) for g in self.opt.param_groups]
        self._warmup = warmup
        self._schedule = LR_SCHEDULES[args.lr_schedule]
        self._step_fn = make_step(self.model, self.opt, self._autocast)
        self._batches = batch_stream(data["train"], args.batch_size, seed)
        self._val, self._eval_every, self._eval_batch = data["val"], args.eval_every, args.batch_size
        self.clock, self.steps, self.error = 0.0, 0, None
        self.step_seconds: list[float] = []
        self.evals: list[dict[str, float]] = []
        self._evaluate()

    @property
    def done(self) -> bool:
        return self.error is not None or self.clock >= self.budget

    def _evaluate(self) -> None:
        self.evals.append({"seconds": self.clock, "step": self.steps,
                           "val_loss": evaluate(self.model, self._val, self._eval_batch, self._autocast)})

    def _set_lr(self) -> None:
        factor = min(1.0, (self.steps + 1) / self._warmup) * self._schedule(self.clock / self.budget)
        for g, base in self._groups:
            g["lr"] = base * factor

    def train_step(self) -> float:
        """One step on the next batch, charged to this run's clock; returns the batch loss before the step."""
        self._set_lr()
        x = next(self._batches)
        sync_cuda()  # on a GPU the clock waits for the step's kernels
        t0 = time.perf_counter()
        loss = self._step_fn(x)
        sync_cuda()
        dt = time.perf_counter() - t0
        self.clock += dt
        self.steps += 1
        self.step_seconds.append(dt)
        return loss

    def advance(self, until: float) -> None:
        """Train until this run's clock reaches ``until`` (or its budget), evaluating every ``eval_every``."""
        until = min(until, self.budget)
        try:
            while self.clock < until:
                loss = self.train_step()
                if not math.isfinite(loss):
                    self.error = "diverged (non-finite loss)"
                    break
                if self.clock >= self.budget or self.clock >= self.evals[-1]["seconds"] + self._eval_every:
                    self._evaluate()
        except Exception as err:  # a peer library failing is a result to report, not a crash
            logger.exception("%s lr=%g failed", self.name, self.lr)
            self.error = f"{type(err).__name__}: {err}"

    def record(self) -> dict[str, Any]:
        stats = getattr(self.opt, "statistics", None)
        timed = sorted(self.step_seconds[1:] or self.step_seconds) or [float("nan")]
        return {"optimizer": self.name, "lr": self.lr, "seed": self.seed, "evals": self.evals, "steps": self.steps,
                "seconds": self.clock, "median_step_seconds": timed[len(timed) // 2],
                "mean_step_seconds": self.clock / max(1, self.steps), "error": self.error,
                "final_val_loss": self.evals[-1]["val_loss"] if self.error is None else float("inf"),
                "output_side": resolved_output_side(self.opt),
                "optimizer_statistics": stats() if callable(stats) else {}}


def peak_memory_gib(name: str, lr: float, data: dict[str, Any], args: LMBenchmarkArguments) -> float:
    """GiB of CUDA memory at the peak of ``--memory_steps`` steps of ``name`` alone: its model, optimizer state and
    activations (the data, resident before, not counted); NaN where the optimizer fails."""
    device = data["device"]
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run: Run | None = None
    try:
        run = Run(name, lr, args.seeds[0], math.inf, data, args)
        for _ in range(args.memory_steps):
            run.train_step()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    except Exception:  # a peer failing is reported by its final runs
        logger.exception("%s: peak memory not measured", name)
        peak = float("nan")
    run = None
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def interleave(runs: list[Run], slice_seconds: float, label: str) -> None:
    """Advance all runs in turns of ``slice_seconds`` of their own training time until each is done."""
    from tqdm.auto import tqdm

    horizon = max(r.budget for r in runs)
    t = 0.0
    with tqdm(total=round(horizon), desc=label, unit="s", disable=None) as bar:
        while not all(r.done for r in runs):
            t += slice_seconds
            for r in runs:
                if not r.done:
                    r.advance(t)
            bar.update(min(slice_seconds, max(horizon - bar.n, 0)))


# ------------------------------------------------------------------------------------------------ sweeps
def sweep(names: list[str], data: dict[str, Any], args: LMBenchmarkArguments,
          fixed: dict[str, float]) -> dict[str, dict[str, Any]]:
    """lr sweeps of the ``names`` whose lr is not ``fixed``, all interleaved; a grid whose best lr is at an end is
    extended by 3x past it (at most twice), so the optimum is interior (:func:`_sweep_group`)."""
    todo = [n for n in names if n not in fixed]
    return _sweep_group(todo, data, args) if todo else {}


def _sweep_group(names: list[str], data: dict[str, Any], args: LMBenchmarkArguments) -> dict[str, dict[str, Any]]:
    """The sweeps of ``names``, all candidates interleaved, in rounds: the grids, then, for each optimizer whose
    best lr is at an end of all it has tried, that lr again beside one 3x beyond it. The best lr of each round is
    chosen among runs of that round only (a later round may find the machine faster or slower, and the budget is
    wall time), so an extension is decided by the re-run of the end it extends, under the same load."""
    results: dict[str, dict[float, float]] = {n: {} for n in names}  # each lr's latest result
    rounds: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    best: dict[str, float] = {}
    pending = {n: sweep_grid(n, args.size) for n in names}
    for _round in range(3):
        runs = [Run(n, lr, args.seeds[0], args.sweep_seconds, data, args)
                for n, lrs in pending.items() for lr in lrs]
        if not runs:
            break
        interleave(runs, args.slice_seconds, "sweep")
        this_round: dict[str, dict[float, float]] = {n: {} for n in pending}
        for r in runs:
            loss = r.record()["final_val_loss"]
            results[r.name][r.lr] = this_round[r.name][r.lr] = loss
            logger.info("sweep %s lr=%g: val loss %.3f after %.0f s (%d steps)", r.name, r.lr, loss, r.clock, r.steps)
        pending = {}
        for n, losses in this_round.items():
            rounds[n].append({f"{lr:g}": v for lr, v in sorted(losses.items())})
            # a diverged run ranks last; when all diverged the lowest lr counts as best, so the next goes below it
            best[n] = min(sorted(losses), key=lambda lr: losses[lr] if math.isfinite(losses[lr]) else math.inf)
            beyond = lr_beyond(best[n], sorted(results[n]))
            if beyond is not None and beyond not in results[n]:
                pending[n] = [best[n], beyond]
    out = {}
    for n in names:
        lrs = sorted(results[n])
        interior = lrs[0] < best[n] < lrs[-1]
        if not interior:
            logger.warning("sweep %s: the best lr %g is still at an end of %s", n, best[n], lrs)
        out[n] = {"lr": best[n], "grid": {f"{lr:g}": results[n][lr] for lr in lrs}, "rounds": rounds[n],
                  "interior": interior}
    return out


def sweep_rounds(sweeps: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Each sweep's rounds, losses to 3 decimals: what the card shows. The latest loss per lr (``grid``) can
    mislead: an lr kept in one round and re-run in the next may then score worse than a neighbour it had beaten."""
    return {n: [{lr: round(v, 3) for lr, v in r.items()} for r in s["rounds"]] for n, s in sweeps.items()}


# ------------------------------------------------------------------------------------------------ reporting
def time_to_reach(rec: dict[str, Any], target: float) -> float:
    """Training seconds at which the validation loss first reaches ``target`` (linear between evaluations)."""
    ev = rec["evals"]
    for prev, cur in zip(ev, ev[1:]):
        if cur["val_loss"] <= target:
            if prev["val_loss"] <= target:
                return prev["seconds"]
            w = (prev["val_loss"] - target) / (prev["val_loss"] - cur["val_loss"])
            return prev["seconds"] + w * (cur["seconds"] - prev["seconds"])
    return float("inf")


def loss_at(rec: dict[str, Any], seconds: float) -> float:
    """Validation loss at ``seconds`` of training time (linear between evaluations; the last one past the end)."""
    ev = rec["evals"]
    for prev, cur in zip(ev, ev[1:]):
        if cur["seconds"] >= seconds:
            w = (seconds - prev["seconds"]) / max(cur["seconds"] - prev["seconds"], 1e-12)
            return prev["val_loss"] + w * (cur["val_loss"] - prev["val_loss"])
    return ev[-1]["val_loss"] if ev else float("nan")


def _spread(values: list[float], fmt: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return "never" if not finite else f"{fmt.format(sum(finite) / len(finite))} ({len(values) - len(finite)} never)"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def summarize(records: list[dict[str, Any]], budget: float) -> list[dict[str, Any]]:
    """One row per optimizer, every ratio paired with AdamW's run of the same seed."""
    adam = {r["seed"]: r for r in records if r["optimizer"] == "adamw"}
    rows = []
    for name in dict.fromkeys(r["optimizer"] for r in records):
        recs = [r for r in records if r["optimizer"] == name]
        row: dict[str, Any] = {"optimizer": name, "lr": recs[0]["lr"], "seeds": [r["seed"] for r in recs],
                               "final": [r["final_val_loss"] for r in recs], "half": [loss_at(r, budget / 2)
                                                                                    for r in recs],
                               "steps": [r["steps"] for r in recs], "errors": [r["error"] for r in recs if r["error"]],
                               "output_side": recs[0].get("output_side"),
                               "state_bytes_per_param": recs[0]["state_bytes"] / recs[0]["params"],
                               "peak_memory_gib": recs[0].get("peak_memory_gib")}
        pairs = [(r, adam[r["seed"]]) for r in recs if r["seed"] in adam]
        row["median_ratio"] = [r["median_step_seconds"] / a["median_step_seconds"] for r, a in pairs]
        row["mean_ratio"] = [r["mean_step_seconds"] / a["mean_step_seconds"] for r, a in pairs]
        row["reach"] = [time_to_reach(r, a["final_val_loss"]) / a["seconds"] for r, a in pairs]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], budget: float) -> str:
    peak = any(row["peak_memory_gib"] is not None for row in rows)
    head = ["optimizer", "lr", f"val loss @ {budget / 2:g} s", f"val loss @ {budget:g} s", "steps",
            "step x AdamW (median / mean)", "time to AdamW's final (x AdamW's)", "state bytes / param",
            *(["peak GiB"] if peak else []), "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ratio = f"{_spread(row['median_ratio'], '{:.2f}')} / {_spread(row['mean_ratio'], '{:.2f}')}"
        notes = sorted(set(row["errors"]))
        if row["output_side"]:
            notes.insert(0, f"output factor: {row['output_side']}")
        cells = [row["optimizer"], f"{row['lr']:g}", _spread(row["half"], "{:.3f}"), _spread(row["final"], "{:.3f}"),
                 _spread([float(s) for s in row["steps"]], "{:.0f}"), ratio, _spread(row["reach"], "{:.2f}"),
                 f"{row['state_bytes_per_param']:.1f}",
                 *([f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else ""] if peak else []),
                 "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    n = len(rows[0]["seeds"]) if rows else 0
    lines.append("")
    lines.append(f"Validation loss in nats per token; {n} seed(s): mean (min-max). Ratios are paired with AdamW's "
                 "run of the same seed; the time to AdamW's final loss is interpolated between evaluations. State "
                 "bytes: the tensors of the optimizer's state_dict at the end, per model parameter"
                 + ("; peak GiB: the optimizer's run alone (model, state, activations)." if peak else "."))
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors: dict[str, Any] = {}
    for r in records:
        first = r["optimizer"] not in colors
        style = "-" if r["optimizer"].startswith(("kbfgs", "mlbfgs")) else "--"
        for ax, key in zip(axes, ("seconds", "step")):
            (line,) = ax.plot([e[key] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], style,
                              color=colors.get(r["optimizer"]), alpha=1.0 if first else 0.35,
                              label=f"{r['optimizer']} (lr {r['lr']:g})" if first else None)
            colors.setdefault(r["optimizer"], line.get_color())
    for ax, xl in zip(axes, ("training seconds (each run's own clock)", "steps")):
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        finals = [e["val_loss"] for r in records for e in r["evals"][1:]]
        if finals:
            ax.set_ylim(min(finals) - 0.1, sorted(finals)[int(0.95 * (len(finals) - 1))] + 0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_card(rows: list[dict[str, Any]], args: LMBenchmarkArguments, table: str, command: str,
               sweeps: dict[str, Any], n_params: int, documents: int) -> str:
    from hf_qn.integrations.model_card import write_benchmark_card

    n_embd, n_layer, n_head = SIZES[args.size]
    return write_benchmark_card(
        output_dir=args.output_dir,
        title=f"hf_qn: causal language modelling on {corpus_name(args)}, {ARCHS[args.arch].title} {args.size} "
              f"({n_params / 1e6:.1f}M parameters)",
        command=command,
        dataset=(("Wikipedia excerpt (gensim test data, 106 articles)", "wikipedia") if not args.text_files else
                 (f"{corpus_name(args)} ({documents} documents)", "text")),
        task=("text-generation", "Causal language modelling"),
        metric_name="val_loss_nats_per_token",
        results=[{"optimizer": r["optimizer"], "value": sum(r["final"]) / len(r["final"])} for r in rows
                 if not r["errors"]],
        hyperparameters={"arch": args.arch, "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head,
                         "vocab_size": args.vocab_size, "block_size": args.block_size, "batch_size": args.batch_size,
                         "budget_s": args.budget,
                         "sweep_s": args.sweep_seconds, "warmup_steps": args.warmup_steps,
                         "lr_schedule": args.lr_schedule, "seeds": args.seeds,
                         "threads": args.threads, "device": args.device, "autocast": args.autocast,
                         "lrs_used": {r["optimizer"]: r["lr"] for r in rows},
                         "sweep rounds (val loss per lr; each round's best decides)": sweep_rounds(sweeps)},
        table=table,
        plot="loss_curves.png",
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id or default_hub_model_id(args),
    )


# ------------------------------------------------------------------------------------------------ main
def prepare_data(args: LMBenchmarkArguments) -> dict[str, Any]:
    if args.text_files:
        articles = load_text_files(args.text_files, args.max_articles)
    else:
        articles = load_wikipedia(args.max_articles)
    train_texts, val_texts = split_articles(articles)
    if not val_texts:
        raise ValueError(f"{corpus_name(args)}: {len(articles)} document(s); at least 10 are needed, since every "
                         "10th is held out for validation (separate documents by blank lines)")
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train = to_blocks(train_texts, tokenizer, args.block_size)
    val = to_blocks(val_texts, tokenizer, args.block_size)[: args.val_blocks]
    if len(train) < args.batch_size or len(val) == 0:
        raise ValueError(f"{corpus_name(args)}: {len(train)} training and {len(val)} validation blocks of "
                         f"{args.block_size} tokens; the benchmark needs at least --batch_size ({args.batch_size}) "
                         "and 1: give more text or a smaller --block_size")
    logger.info("%s: %d train / %d validation documents; BPE vocabulary %d; %d train blocks (%d tokens), "
                "%d validation blocks", corpus_name(args), len(train_texts), len(val_texts),
                tokenizer.get_vocab_size(), len(train), train.numel(), len(val))
    return {"train": train, "val": val, "vocab_size": args.vocab_size, "documents": len(articles)}


def parse_fixed_lrs(items: list[str], names: list[str] | None = None) -> dict[str, float]:
    """``--lr NAME=VALUE ...`` as ``{name: lr}``. With ``names`` (the optimizers of the run), a variant
    (``kbfgs:k=v``) not given its own lr takes its base's (``kbfgs=...``) when its lr is on the same scale (the same
    sweep grid: not a ``graft=none`` variant, whose lr is the paper's α, nor mL-BFGS's ``normalize=unit``, whose lr is
    a step length), a row whose name fixes its lr (``muon:lr=0.002``) takes that lr, and a NAME that is none of
    ``names`` nor the base of one, or that names a row which fixes its own lr, is refused."""
    fixed = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep:
            raise ValueError(f"Invalid --lr {item!r}: write NAME=VALUE with NAME one of {ALL_OPTIMIZERS}")
        fixed[name] = float(value)
    if names is None:
        return fixed
    bases = {n: split_variant(n)[0] for n in names}
    unknown = sorted(set(fixed) - set(names) - set(bases.values()))
    if unknown:
        raise ValueError(f"Invalid --lr for {unknown}: not among --optimizers {names} nor the base of one; write "
                         "the optimizer's name as in --optimizers, or its base (kbfgs=... also sets kbfgs:k=v)")
    named = {n: lr for n in names if (lr := variant_lr(n)) is not None}
    twice = sorted(set(named) & set(fixed))
    if twice:
        raise ValueError(f"Invalid --lr for {twice}: the name already fixes the lr; drop one of the two")
    fixed.update(named)
    for n, base in bases.items():
        if n not in fixed and base in fixed and sweep_grid(n) == sweep_grid(base):  # same lr scale (not graft=none)
            fixed[n] = fixed[base]
    return fixed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(LMBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.size not in SIZES:
        raise ValueError(f"Invalid --size {args.size!r}: one of {list(SIZES)}")
    if args.arch not in ARCHS:
        raise ValueError(f"Invalid --arch {args.arch!r}: one of {list(ARCHS)}")
    if args.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"Invalid --lr_schedule {args.lr_schedule!r}: one of {list(LR_SCHEDULES)}")
    check_optimizers(args.optimizers, args.arch)  # an unknown name, a bad variant, a missing peer: before any work
    from hf_qn.integrations.model_card import code_description, hardware_description

    code = code_description()  # the hf_qn this run imported, as it starts
    logger.info("%s", code)
    device, autocast_dtype = resolve_device(args)
    names = ["adamw"] + [n for n in args.optimizers if n != "adamw"]  # AdamW is the reference of every ratio
    fixed = parse_fixed_lrs(args.lr, names)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.makedirs(args.output_dir, exist_ok=True)
    data = prepare_data(args)
    data.update(device=device, autocast=autocast_dtype, train=data["train"].to(device), val=data["val"].to(device))
    sweeps = sweep(names, data, args, fixed) if args.sweep_seconds > 0 else {}
    lrs = {n: fixed.get(n, sweeps.get(n, {}).get("lr", sweep_grid(n, args.size)[1])) for n in names}
    peaks = ({n: peak_memory_gib(n, lrs[n], data, args) for n in names}
             if device.type == "cuda" and args.memory_steps > 0 else {})
    runs = [Run(n, lrs[n], seed, args.budget, data, args) for seed in args.seeds for n in names]
    n_params = sum(p.numel() for p in runs[0].model.parameters())
    logger.info("%s %s: %.2fM parameters on %s (autocast %s); final runs %s", ARCHS[args.arch].title, args.size,
                n_params / 1e6, device, autocast_dtype, lrs)
    interleave(runs, args.slice_seconds, "final runs")
    # the state's size from the final runs only (a state_dict per sweep candidate would be wasted)
    records = [{**r.record(), "state_bytes": state_bytes(r.opt, r.name), "params": n_params,
                **({"peak_memory_gib": peaks[r.name]} if peaks else {})} for r in runs]
    rows = summarize(records, args.budget)
    table = markdown_table(rows, args.budget)
    command = "python " + " ".join(["scripts/benchmark_lm.py", *argv])
    meta = {"command": command, "args": dataclasses.asdict(args), "torch": torch.__version__, "params": n_params,
            "machine": hardware_description(), "code": code, "date": time.strftime("%Y-%m-%d")}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "sweeps": sweeps, "rows": rows, "records": records}, f, indent=1)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(records, os.path.join(args.output_dir, "loss_curves.png"),
         f"{ARCHS[args.arch].title} {args.size} ({n_params / 1e6:.1f}M) on {corpus_name(args)}, "
         f"batch {args.batch_size}x{args.block_size} tokens")
    write_card(rows, args, table, command, sweeps, n_params, data["documents"])
    print(table)
    return {"meta": meta, "sweeps": sweeps, "rows": rows, "records": records}


if __name__ == "__main__":
    main()
