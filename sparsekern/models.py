"""Small reference models used by the tests, benchmarks and training jobs, and the training
command's model registry (:data:`MODEL_BUILDERS`, :func:`make_model`).

Plain dense ``nn`` modules: make them sparse with :func:`sparsekern.sparsify`.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + (x if self.downsample is None else self.downsample(x))).relu()


class ResNetCifar(nn.Module):
    """ResNet-18 layout for 32x32 inputs (3x3 stem, no max-pool), ``width`` channels in stage 1.

    Input float [N, 3, H, W] -> logits [N, num_classes].
    """

    def __init__(self, num_classes: int = 10, width: int = 64, blocks=(2, 2, 2, 2), in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.bn1(self.conv1(x)).relu())
        return self.fc(x.mean((2, 3)))


def resnet20(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> ResNetCifar:
    """ResNet-20 for CIFAR (3 stages of 3 basic blocks, 16-32-64 channels)."""
    return ResNetCifar(num_classes, width, blocks=(3, 3, 3), in_channels=in_channels)


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> ResNetCifar:
    """ResNet-18 (2-2-2-2 basic blocks) for CIFAR-sized inputs."""
    return ResNetCifar(num_classes, width)


def mlp(sizes=(64, 256, 256, 10)) -> nn.Sequential:
    """Linear-ReLU stack over ``sizes`` (no ReLU after the last layer)."""
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class LeNet5(nn.Module):
    """LeNet-5-style CNN: conv5(6)-pool-conv5(16)-pool-fc120-fc84-fc. Input [N, C, H, W] (H, W >= 8)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        pad = 2 if image_size < 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 120), nn.ReLU(),
                                        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg(num_classes: int = 10, cfg=(64, "M", 128, "M", 256, 256, "M", 512, 512, "M"), in_channels: int = 3):
    """VGG-style CNN: 3x3 conv-BN-ReLU stacks ("M": 2x2 max-pool), global average pool, linear head."""
    layers, c = [], in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention built from four ``nn.Linear`` (``q``, ``k``, ``v``,
    ``out``, each [d, d]) so that :func:`sparsekern.sparsify` converts every projection; the
    scores and their softmax run in ``F.scaled_dot_product_attention(is_causal=True)``.

    x float [B, T, d] -> float [B, T, d]; ``d`` must be a multiple of ``heads``.
    """

    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"the model width {d} must be a multiple of heads={heads}")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` with the
    MLP ``fc`` [d -> 4d], GELU, ``proj`` [4d -> d]. x float [B, T, d] -> [B, T, d]."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small decoder-only transformer (GPT-2 layout, no dropout).

    Token and learned position embeddings (``nn.Embedding``, they stay dense), ``layers``
    :class:`DecoderBlock` s, a final LayerNorm and an LM head ``head`` (``nn.Linear`` [d ->
    vocab], not tied to the token embedding). :func:`sparsekern.sparsify` makes the attention
    projections, the MLPs and the head sparse.

    tokens int64 [B, T] (T <= ``context``) -> logits float [B, T, vocab].
    """

    def __init__(self, vocab: int = 256, context: int = 64, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(DecoderBlock(width, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"tokens has {t} positions, more than the model's context {self.context}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        return self.head(self.ln_f(self.blocks(x)))


# --- the training command's registry -------------------------------------------------------

class ModelInputError(ValueError):
    """The data does not fit the model (an image model on flat features, a token model on
    images, an option the model does not take); the message says which and why."""


def _features(name, input_shape, tokens):
    if tokens:
        raise ModelInputError(f"model {name!r} classifies float inputs; the dataset gives token sequences "
                              f"(use --model gpt)")


def _image(name, input_shape, tokens):
    _features(name, input_shape, tokens)
    if len(input_shape) != 3:
        raise ModelInputError(f"model {name!r} needs image inputs; the dataset gives shape {tuple(input_shape)}")


def _mlp(input_shape, classes, tokens, width=None):
    _features("mlp", input_shape, tokens)
    n_in = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), *mlp((n_in, width or 1024, width or 1024, classes)))


def _lenet5(input_shape, classes, tokens):
    _image("lenet5", input_shape, tokens)
    return LeNet5(classes, input_shape[0], input_shape[1])


def _resnet20(input_shape, classes, tokens):
    _image("resnet20", input_shape, tokens)
    return resnet20(classes, in_channels=input_shape[0])


def _vgg(input_shape, classes, tokens, width=None):
    _image("vgg", input_shape, tokens)
    base = width or 64                                           # channels of the first stage
    if base < 1:
        raise ModelInputError(f"model 'vgg': --width must be >= 1, got {base}")
    cfg = [base, "M", 2 * base, "M", 4 * base, 4 * base, "M", 8 * base, 8 * base, "M"]
    pools = max(0, int(math.log2(min(input_shape[1:]))) - 1)    # keep >= 2x2 before the head
    while cfg.count("M") > pools:
        cfg.pop(len(cfg) - 1 - cfg[::-1].index("M"))
    return vgg(classes, cfg=tuple(cfg), in_channels=input_shape[0])


def _gpt(input_shape, classes, tokens, width=None, layers=None, heads=None):
    if not tokens or len(input_shape) != 1:
        raise ModelInputError(f"model 'gpt' needs token sequences (--dataset text); the dataset gives "
                              f"float inputs of shape {tuple(input_shape)}")
    width, heads = width or 128, heads or 4
    if width % heads:
        raise ModelInputError(f"model 'gpt': the width {width} must be a multiple of --heads {heads}")
    return GPT(classes, input_shape[0], width, layers or 2, heads)


# name -> builder(input_shape, num_classes, tokens, **hyper) -> dense nn.Module; the keyword
# arguments a builder declares (width, layers, heads) are the options the model takes, None
# meaning its default. Add a model here; sparsify makes it sparse.
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp, "lenet5": _lenet5, "resnet20": _resnet20, "vgg": _vgg, "gpt": _gpt}
MODELS = tuple(MODEL_BUILDERS)


def make_model(name: str, input_shape, num_classes: int, tokens: bool = False, **hyper) -> nn.Module:
    """The dense model ``name`` of :data:`MODEL_BUILDERS` for the data's per-example
    ``input_shape`` (``(T,)`` for token sequences, with ``tokens=True``) and ``num_classes``
    (the vocabulary size for tokens). ``hyper``: width, layers, heads (None: the model's default).

    Raises :class:`ModelInputError` when the data does not fit the model or a given
    hyperparameter is one the model does not take.
    """
    if name not in MODEL_BUILDERS:
        raise ModelInputError(f"unknown model {name!r}; choose one of {MODELS}")
    builder = MODEL_BUILDERS[name]
    takes = set(inspect.signature(builder).parameters) - {"input_shape", "classes", "tokens"}
    extra = sorted(k for k, v in hyper.items() if v is not None and k not in takes)
    if extra:
        raise ModelInputError(f"model {name!r} takes no {', '.join(extra)} option (it takes "
                              f"{', '.join(sorted(takes)) or 'none'})")
    return builder(tuple(input_shape), num_classes, tokens, **{k: v for k, v in hyper.items() if k in takes})
