"""LoRA and QLoRA on the LLM of a training stage, through peft (LLaVA's ``--lora_enable``, ``--bits 4``).

    stages:
      - name: finetune
        freeze_vision: true
        projector_lr: 2.0e-5            # LLaVA's mm_projector_lr: projector(s) and pipeline stages
        lora: {r: 128, alpha: 256}      # LLaVA's defaults; bits: 4 for QLoRA (CUDA + bitsandbytes)

The adapters are injected in place (``peft.LoraModel`` on ``model.llm.hf``): ``model.llm.hf`` stays
the transformers class, so our layer loop (``DecoderLM``: ``hf.model.embed_tokens / layers / norm``,
``hf.lm_head``) runs unchanged, and the LLM's own weights are frozen. A wrapped layer's keys gain
``.base_layer.`` and ``.lora_A/B.default.``; the export folds the adapters back
(:func:`merged_state_dict`), so ``final/`` holds the plain keys and ``llava_deft.load_model`` reads it
with no peft involved.

QLoRA (``bits: 4``) swaps the LLM's linear layers, all of them but the output head as transformers'
``BitsAndBytesConfig`` loading does, for bitsandbytes ``Linear4bit`` (NF4 by default, double
quantisation), quantised as they move to the GPU; the adapters train in the compute dtype. peft's
``prepare_model_for_kbit_training`` is not called: it freezes the base (``LoraModel`` does that) and
upcasts the other weights to fp32, which DeepSpeed's bf16 cast undoes; we use no gradient
checkpointing. The export dequantises the base weights before folding the adapters in.

Benchmark (memory and step time, LoRA against QLoRA, on a GPU): ``python eval/bench_qlora.py``.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, LoraModel, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight, get_bnb_param_type
from torch import Tensor, nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config.train import LoraSpec
    from ..model.llm import DecoderLM

ADAPTER = "default"
"""peft's name of the one adapter a stage trains."""


def qlora_problems() -> list[str]:
    """What keeps 4-bit base weights (``lora.bits: 4``) from running here; empty when nothing does."""
    out = []
    if not torch.cuda.is_available():
        out.append("no CUDA device here (bitsandbytes' 4-bit layers train on GPUs only)")
    if importlib.util.find_spec("bitsandbytes") is None:
        out.append("bitsandbytes is not installed (pip install bitsandbytes)")
    return out


def linear_layer_names(hf: nn.Module) -> list[str]:
    """The LLM's linear layers LoRA can wrap: every ``nn.Linear`` but the output head (LLaVA's
    ``find_all_linear_names``; peft's ``all-linear``)."""
    head = hf.get_output_embeddings()
    return [n for n, m in hf.named_modules() if isinstance(m, nn.Linear) and m is not head]


def check_targets(hf: nn.Module, spec: "LoraSpec", where: str) -> None:
    """Every name in ``spec.target_modules`` names a linear layer of ``hf`` (peft matches a name
    against the end of a layer's dotted path)."""
    if isinstance(spec.target_modules, str):
        return
    names = linear_layer_names(hf)
    unknown = [t for t in spec.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"{where}.target_modules: {unknown} name no linear layer of the LLM; its linear layers "
                          f"are {kinds}, or use all-linear")


def quantize_4bit(hf: nn.Module, spec: "LoraSpec", compute_dtype: torch.dtype, device: torch.device) -> None:
    """Swap ``hf``'s linear layers but the head for bitsandbytes ``Linear4bit`` holding the same
    weights, and move ``hf`` to ``device`` (a CUDA device), which quantises them."""
    import bitsandbytes as bnb

    for name in linear_layer_names(hf):
        lin = hf.get_submodule(name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=spec.double_quant, quant_type=spec.quant_type)
        q.load_state_dict(lin.state_dict())  # bitsandbytes' way: plain weights in, quantised on .to(cuda)
        q.requires_grad_(False)
        hf.set_submodule(name, q)
    hf.to(device)


def add_lora(lm: "DecoderLM", spec: "LoraSpec", compute_dtype: torch.dtype = torch.float32,
             device: torch.device | None = None, where: str = "lora") -> LoraModel:
    """Inject ``spec``'s adapters into ``lm.hf`` in place (4-bit base weights on ``device`` first when
    ``spec.bits == 4``); every other weight of ``lm`` is frozen. ``where`` names the spec in errors."""
    check_targets(lm.hf, spec, where)
    if spec.bits == 4:
        problems = qlora_problems()
        if problems:
            raise ConfigError(f"{where}.bits: 4 (QLoRA) cannot run: {'; '.join(problems)}; remove bits or train on a GPU")
        quantize_4bit(lm.hf, spec, compute_dtype, device if device is not None else torch.device("cuda"))
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, bias="none")
    return LoraModel(lm.hf, config, ADAPTER)


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of ``module``, as peft counts them (a 4-bit weight counts its
    unpacked size; a ZeRO-3 placeholder its full size)."""
    return PeftModel.get_nb_trainable_parameters(module)


def merged_state_dict(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (``module.state_dict()``) with every LoRA adapter of ``module`` folded into its base
    weight, W + scale · B @ A (peft's ``get_delta_weight``, in fp32), under the plain layer's keys:
    what ``merge_and_unload`` leaves, with 4-bit weights dequantised (those of layers without an
    adapter too). ``module``'s parameters must be whole (inside ZeRO-3's ``GatheredParameters``);
    with neither adapters nor 4-bit layers ``state`` comes back as is."""
    out = dict(state)
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer):
            base, delta = layer.get_base_layer(), layer.get_delta_weight(ADAPTER).float()
        elif get_bnb_param_type(getattr(layer, "weight", None)) and not name.endswith(".base_layer"):
            base, delta = layer, 0.0  # a 4-bit layer LoRA does not wrap (target_modules a subset)
        else:
            continue
        prefix = f"{name}."
        for key in [k for k in out if k.startswith(prefix)]:  # base_layer.*, lora_A/B.*, 4-bit quant state
            del out[key]
        out[f"{prefix}weight"] = (dequantize_module_weight(base).float() + delta).detach().cpu()
        if base.bias is not None:
            out[f"{prefix}bias"] = base.bias.detach().float().cpu()
    return out
