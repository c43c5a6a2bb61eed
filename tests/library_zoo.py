"""Tiny models from the libraries people use, for the library-zoo tests (issue 14).

Every model is built from code with random initialization (no weights, no configs
downloaded: ``HF_HUB_OFFLINE=1``) at toy sizes (hidden 32, 2 layers, 2 heads,
vocabulary 100, images 32x32), with dropout off so train-mode runs are deterministic.

Install route (the ``zoo`` extra; see pyproject.toml): transformers, timm and
torchvision 0.28.0, the release made for torch 2.13.0. On PyPI that torchvision is a
CUDA build: beside the CPU torch its compiled ops (``_C.so``, linked to
``libtorch_cuda``) cannot load. torchvision tolerates that everywhere except two
unguarded ``register_fake("torchvision::nms" / "qnms")`` calls, which raise
``operator torchvision::nms does not exist`` and make ``import torchvision`` -- and
so ``import timm`` and transformers' model modules, which import it -- fail.
``make`` installs ``tools/torchvision_shim.py``, which defines those two operator
schemas (no kernels) before the first import; :func:`import_torchvision` applies the
same shim where an environment was set up without it. The models used here are pure
Python and never call the detection operators.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 100
SEQ = 8
BATCH = 2
IMAGE = 32
CLASSES = 10


def import_torchvision() -> Any:
    """``import torchvision``; None if absent.

    ``make`` installs ``tools/torchvision_shim.py`` into an environment where PyPI's
    CUDA torchvision cannot import beside the CPU torch. In an environment set up
    some other way that same shim is applied here, on that exact failure.
    """
    try:
        import torchvision
    except ImportError:
        return None
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        path = Path(__file__).resolve().parent.parent / "tools" / "torchvision_shim.py"
        spec = importlib.util.spec_from_file_location("_ensembling_torchvision_shim", path)
        shim = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shim)
        shim.install()
        import torchvision
    return torchvision


def missing() -> str | None:
    """Why the zoo cannot run here (a missing package), or None."""
    if import_torchvision() is None:
        return "torchvision is not installed (pip install torchvision==0.28.0 -e '.[zoo]')"
    for name in ("transformers", "timm", "scipy"):
        try:
            __import__(name)
        except ImportError:
            return f"{name} is not installed (pip install torchvision==0.28.0 -e '.[zoo]')"
    return None


@dataclass(frozen=True)
class ZooModel:
    """A factory, how to make its inputs, and how to pull the compared tensors out of its output."""

    name: str
    library: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, tuple[int, ...]], tuple[Any, ...]]
    select: Callable[[Any], Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)  # call keywords (use_cache=False, ...)
    causal_lm: bool = False
    has_batchnorm: bool = False
    train_inputs: Callable[[torch.Generator, tuple[int, ...]], tuple[Any, ...]] | None = None  # float64: smaller
    # The library's named model, when ``factory`` is a smaller one of the same family (same layers, same
    # init code): construction and initialization statistics use it, the runs use ``factory``.
    reference: Callable[[], nn.Module] | None = None


def token_ids(gen: torch.Generator, lead: tuple[int, ...]) -> tuple[Tensor]:
    """``[*lead, BATCH, SEQ]`` token ids."""
    return (torch.randint(0, VOCAB, (*lead, BATCH, SEQ), generator=gen),)


def seq2seq_ids(gen: torch.Generator, lead: tuple[int, ...]) -> tuple[Any, ...]:
    """T5's positional inputs: ``input_ids``, ``attention_mask=None``, ``decoder_input_ids``."""
    enc = torch.randint(0, VOCAB, (*lead, BATCH, SEQ), generator=gen)
    dec = torch.randint(0, VOCAB, (*lead, BATCH, SEQ // 2), generator=gen)
    return (enc, None, dec)


def images(gen: torch.Generator, lead: tuple[int, ...], size: int = IMAGE) -> tuple[Tensor]:
    """``[*lead, BATCH, 3, size, size]`` images."""
    return (torch.randn(*lead, BATCH, 3, size, size, generator=gen),)


def small_images(gen: torch.Generator, lead: tuple[int, ...]) -> tuple[Tensor]:
    """16x16 images: still 1x1 (not 0x0) after ResNet's and MobileNet's 32x downsampling."""
    return images(gen, lead, 16)


def _hidden(out: Any) -> Tensor:
    return out.last_hidden_state


def _logits(out: Any) -> Tensor:
    return out.logits


def _tensor(out: Any) -> Tensor:
    return out


def bert() -> nn.Module:
    import_torchvision()  # transformers and timm import it
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg)


def distilbert() -> nn.Module:
    import_torchvision()  # transformers and timm import it
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return DistilBertModel(cfg)


def gpt2() -> nn.Module:
    import_torchvision()  # transformers and timm import it
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def llama() -> nn.Module:
    import_torchvision()  # transformers and timm import it
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def t5() -> nn.Module:
    import_torchvision()  # transformers and timm import it
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


def vit() -> nn.Module:
    import_torchvision()  # transformers and timm import it
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=IMAGE, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=CLASSES)


def convnext() -> nn.Module:
    import_torchvision()  # transformers and timm import it
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), num_classes=CLASSES)


def resnet18() -> nn.Module:
    return import_torchvision().models.resnet18(num_classes=CLASSES)


def resnet10() -> nn.Module:
    """ResNet-18's blocks, layers and init code with one BasicBlock per stage (half the parameters)."""
    models = import_torchvision().models
    return models.ResNet(models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)


def mobilenet() -> nn.Module:
    return import_torchvision().models.mobilenet_v3_small(num_classes=CLASSES, width_mult=0.25, dropout=0.0)


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("bert", "transformers", bert, token_ids, _hidden),
        ZooModel("distilbert", "transformers", distilbert, token_ids, _hidden),
        ZooModel("gpt2", "transformers", gpt2, token_ids, _logits, {"use_cache": False}, causal_lm=True),
        ZooModel("llama", "transformers", llama, token_ids, _logits, {"use_cache": False}, causal_lm=True),
        ZooModel("t5", "transformers", t5, seq2seq_ids, _logits, {"use_cache": False}),
        ZooModel("vit", "timm", vit, images, _tensor),
        ZooModel("convnext", "timm", convnext, images, _tensor),
        ZooModel(
            "resnet18",
            "torchvision",
            resnet10,
            small_images,
            _tensor,
            has_batchnorm=True,
            train_inputs=small_images,
            reference=resnet18,
        ),
        ZooModel(
            "mobilenet_v3_small",
            "torchvision",
            mobilenet,
            small_images,
            _tensor,
            has_batchnorm=True,
            train_inputs=small_images,
        ),
    )
}


def in_dims_for(args: tuple[Any, ...]) -> tuple[int | None, ...]:
    """``in_dims`` giving each member its own slice of every tensor input (None stays None)."""
    return tuple(None if a is None else 0 for a in args)


def member_args(args: tuple[Any, ...], i: int) -> tuple[Any, ...]:
    """Member ``i``'s slice of per-member inputs."""
    return tuple(None if a is None else a[i] for a in args)


def per_member_keyword_call(ens: nn.Module, args: tuple[Any, ...], **per_member: Tensor) -> Any:
    """Call ``ens`` with shared ``args`` and per-member keyword tensors (leading member dimension).

    The API this assumes for issue 14 point 3 (keyword inputs addressed by ``in_dims``) lives
    here only, so the core's final spelling changes one line.
    """
    dims = {name: 0 for name in per_member}
    return ens(*args, in_dims=dims, **per_member)  # a dict: the named keywords split, the rest shared
