"""Tiny models built from configs (no downloads) and synthetic batches, shared by all tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(sizes=(6, 8, 5, 3), bias=True, inplace=False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=inplace))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm + Linear on 8x8 single-channel images (sklearn digits)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def tiny_gpt2(vocab: int = 97, n_embd: int = 32, n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def tiny_llama(vocab: int = 97, hidden: int = 32, n_layer: int = 1):
    """A Llama built from a config: separate q/k/v, SwiGLU, RMSNorm, an untied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=n_layer,
                      num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg)


def tiny_bert(vocab: int = 97, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def tiny_vit(num_labels: int = 10):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=num_labels,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg)


def tiny_resnet(num_labels: int = 10):
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=num_labels)
    return ResNetForImageClassification(cfg)


def token_batch(batch: int = 4, seq: int = 8, vocab: int = 97, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def digits_tensors(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real 8x8 handwritten digits from scikit-learn, scaled to [0, 1], as (N, 1, 8, 8) images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(d.target), generator=g)[:n]
    x = torch.tensor(d.images, dtype=torch.float32)[idx].unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)[idx]
    return x, y
