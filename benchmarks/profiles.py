"""Parameter profiles: the parameter shapes of real networks, written out, so nothing is downloaded.

Each profile is a list of shapes in the order the model's ``parameters()`` yields them. The counts are
checked by ``benchmarks/test_bench.py`` against the figures of the original models:

============  =======  ============  ====================================================
profile       tensors  elements      source
============  =======  ============  ====================================================
resnet50      161      25,557,032    torchvision ``resnet50()``
vit_b16       152      86,567,656    torchvision ``vit_b_16()``
gpt2          148      124,439,808   Hugging Face ``GPT2LMHeadModel`` (gpt2, lm_head tied to wte)
many_small    4,096    16,777,216    4,096 tensors of 4,096 elements: per-tensor overhead dominates
one_big       1        67,108,864    one 8192 x 8192 matrix: pure streaming, no per-tensor overhead
resnet50_l1   33       225,344       ResNet-50's stem and layer1: real shapes, small (pytest-benchmark, tests)
============  =======  ============  ====================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

Shape = tuple[int, ...]


def resnet50() -> list[Shape]:
    """torchvision ResNet-50 v1.5: bottleneck blocks [3, 4, 6, 3], expansion 4, stride on the 3x3 conv."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # stem conv + bn (weight, bias)
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_ch = 4 * width
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if block == 0:  # downsample: 1x1 conv + bn
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    return shapes + [(1000, 2048), (1000,)]


def _transformer_layer(dim: int, hidden: int, qkv_first: bool) -> list[Shape]:
    """One pre-norm encoder layer: LN, fused QKV projection, output projection, LN, two-layer MLP.

    torchvision stores Linear weights as (out, in); Hugging Face GPT-2's Conv1D as (in, out).
    """
    ln = [(dim,), (dim,)]
    qkv: list[Shape] = [(3 * dim, dim), (3 * dim,)] if qkv_first else [(dim, 3 * dim), (3 * dim,)]
    proj = [(dim, dim), (dim,)]
    fc1: list[Shape] = [(hidden, dim), (hidden,)] if qkv_first else [(dim, hidden), (hidden,)]
    fc2: list[Shape] = [(dim, hidden), (dim,)] if qkv_first else [(hidden, dim), (dim,)]
    return ln + qkv + proj + ln + fc1 + fc2


def vit_b16() -> list[Shape]:
    """torchvision ViT-B/16 at 224 px: 12 layers, width 768, MLP 3072, 197 tokens, 1000 classes."""
    shapes: list[Shape] = [(1, 1, 768), (768, 3, 16, 16), (768,), (1, 197, 768)]  # cls token, patch conv, pos
    for _ in range(12):
        shapes += _transformer_layer(768, 3072, qkv_first=True)
    return shapes + [(768,), (768,), (1000, 768), (1000,)]  # final LN, head


def gpt2() -> list[Shape]:
    """GPT-2 small: vocabulary 50257, context 1024, 12 layers, width 768; the LM head is tied to wte."""
    shapes: list[Shape] = [(50257, 768), (1024, 768)]  # wte, wpe
    for _ in range(12):
        shapes += _transformer_layer(768, 3072, qkv_first=False)
    return shapes + [(768,), (768,)]  # ln_f


def many_small() -> list[Shape]:
    """4096 tensors of 4096 elements: what launch- and Python-bound implementations pay for."""
    return [(4096,)] * 4096


def one_big() -> list[Shape]:
    """One 8192 x 8192 matrix (64 Mi elements, 256 MiB in fp32): far beyond any cache, no per-tensor cost."""
    return [(8192, 8192)]


def resnet50_l1() -> list[Shape]:
    """ResNet-50's first 33 tensors (stem + layer1): real shapes at 1% of the size, for quick runs."""
    return resnet50()[:33]


PROFILES: dict[str, Callable[[], list[Shape]]] = {
    "resnet50": resnet50,
    "vit_b16": vit_b16,
    "gpt2": gpt2,
    "many_small": many_small,
    "one_big": one_big,
    "resnet50_l1": resnet50_l1,
}


def numel(shapes: list[Shape]) -> int:
    """Total number of elements of a profile."""
    return sum(math.prod(s) for s in shapes)
