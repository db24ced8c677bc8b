"""Seeds 001/003's facade: a causal LM whose chosen decoder layers see a recursively compressed context
(issue 18).

    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained("path/to/local/gpt2", local_files_only=True)
    model = CompressibleLanguageModel(base, use_progressive_compression=True, compression_layers=[3, 6, 9])
    loss, logits = model(input_ids, attention_mask, labels=input_ids)
    model.compression_stats()          # per stage: tokens in / out, compression ratio, threshold, cluster size
    model.save_pretrained("runs/cm"); CompressibleLanguageModel.from_pretrained("runs/cm")

A ``progressive_compression`` (thresholds by relative depth) or ``recursive_compression_llm`` stage
(``pipeline/stages/recursive.py``) runs before each of ``compression_layers`` through
:class:`~llava_deft.model.llm.decoder.DecoderLM`'s own layer loop (the HF model is never patched), with
``tokens: all``: text merges, each cluster at its last member, so the logits stay causal. The loss is
next-token cross-entropy on the columns that kept logits (a column merged into a later one predicts
nothing: ``LLMStages.present``) plus the stages' contrastive losses. Any family of our loop works:
GPT-2, Llama (SmolLM), Qwen2, Qwen3. The trainer's route to the same model is a text-only
``LlavaDeftForCausalLM`` with these stages (``--use_progressive_compression``, llava_deft/train/seed_flags.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import build_pipeline
from pipeline.llm import collect_losses
from pipeline.recursive import compression_stats

from ...errors import CheckpointError
from ..splice import IGNORE_INDEX
from .decoder import DecoderLM, generate_from_embeds

__all__ = ["CompressibleLanguageModel", "default_layers"]

CONFIG_FILE = "compressible_config.json"
WEIGHTS_FILE = "compression.safetensors"
BASE_DIR = "base"


def default_layers(num_layers: int) -> list[int]:
    """Decoder layers at relative depths 1/4, 1/2 and 3/4 (distinct, each in 1..num_layers-1)."""
    return sorted({min(max(1, round(num_layers * f)), num_layers - 1) for f in (0.25, 0.5, 0.75)})


def stage_specs(num_layers: int, compression_layers: Sequence[int] | None, use_progressive_compression: bool,
                **options) -> list[dict]:
    """The ``llm:`` stage list: one stage per layer, ``tokens: all`` unless ``options`` says otherwise; with
    progressive compression ``similarity_threshold`` is its deepest (``aggressive``) floor."""
    layers = sorted(set(int(i) for i in (compression_layers or default_layers(num_layers))))
    bad = [i for i in layers if not 0 < i < num_layers]
    if bad:
        raise ValueError(f"compression_layers {bad}: a stage runs between decoder layers, so each must be in "
                         f"1..{num_layers - 1} (the model has {num_layers} layers)")
    name = "progressive_compression" if use_progressive_compression else "recursive_compression_llm"
    options = {k: v for k, v in options.items() if v is not None}
    if use_progressive_compression and "similarity_threshold" in options:
        options["aggressive"] = options.pop("similarity_threshold")
    options.setdefault("tokens", "all")
    return [{"name": name, "layer": i, **options} for i in layers]


class CompressibleLanguageModel(nn.Module):
    """An HF causal LM (or :class:`DecoderLM`) with recursive compression before ``compression_layers``
    (see the module docstring). ``freeze_base``: only the compression stages train."""

    def __init__(self, base_model: nn.Module, compression_layers: Sequence[int] | None = None,
                 use_progressive_compression: bool = True, freeze_base: bool = False, **stage_options):
        super().__init__()
        self.lm = base_model if isinstance(base_model, DecoderLM) else DecoderLM(base_model)
        self.lm.requires_grad_(not freeze_base)
        self.specs = stage_specs(self.lm.num_layers, compression_layers, use_progressive_compression, **stage_options)
        self.settings = {"use_progressive_compression": use_progressive_compression, "freeze_base": freeze_base}
        self.compression = build_pipeline({"llm": self.specs}, dim=self.lm.hidden_size).llm
        self.lm.bind_stages(self.compression)  # refuses a bad layer now, not at the first call

    @property
    def compression_layers(self) -> list[int]:
        return [s["layer"] for s in self.specs]

    def trainable_share(self) -> float:
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.parameters() if p.requires_grad) / total

    def compression_stats(self) -> dict[str, dict[str, float]]:
        """Per stage (``name@layer``) of the last call: tokens in / out per row, compression ratio, threshold,
        mean cluster size (floats: read here, never inside a forward)."""
        return compression_stats(self.compression)

    @staticmethod
    def _positions(attention_mask: Tensor) -> Tensor:
        return (attention_mask.long().cumsum(1) - 1).clamp(min=0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None):
        """Left- or right-padded ``input_ids`` (B, L) -> ``(loss or None, logits (B, L, V))``; columns merged
        into a later one have zero logits and no loss. ``loss`` = next-token cross-entropy on the columns
        with logits (labels of -100 skipped) + the stages' contrastive losses."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        runner = self.lm.bind_stages(self.compression)
        logits, _ = self.lm(self.lm.embed(input_ids), attention_mask, self._positions(attention_mask), stages=runner)
        aux = collect_losses(self.compression)
        if labels is None:
            return None, logits
        target = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        if runner.present is not None:
            target = target.masked_fill(~runner.present[:, :-1], IGNORE_INDEX)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
        return loss + sum(aux.values(), torch.zeros((), device=loss.device)), logits

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0, **kwargs) -> Tensor:
        """New tokens (B, T) from LEFT-padded prompts, the prefill through the compressed layers."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = eos_token_id if eos_token_id is not None else (self.lm.config.eos_token_id or [])
        return generate_from_embeds(self.lm, self.lm.embed(input_ids), attention_mask, self._positions(attention_mask),
                                    max_new_tokens, eos, pad_token_id, stages=self.compression, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """``base/`` (the HF model's ``save_pretrained``), the stages' weights (safetensors) and their config."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.lm.hf.save_pretrained(out / BASE_DIR)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.compression.state_dict().items()}, out / WEIGHTS_FILE)
        (out / CONFIG_FILE).write_text(json.dumps({"stages": self.specs, **self.settings}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CompressibleLanguageModel":
        """Load what :meth:`save_pretrained` wrote (local files only; ``CheckpointError`` names what is missing)."""
        from safetensors.torch import load_file

        from .decoder import build_llm

        path = Path(directory)
        missing = [p for p in (path / CONFIG_FILE, path / WEIGHTS_FILE, path / BASE_DIR / "config.json") if not p.exists()]
        if missing:
            raise CheckpointError(f"'{path}' is not a saved CompressibleLanguageModel: missing {[str(p) for p in missing]}")
        cfg = json.loads((path / CONFIG_FILE).read_text())
        stages = cfg["stages"]
        progressive = cfg["use_progressive_compression"]
        options = {k: v for k, v in stages[0].items() if k not in ("name", "layer")}
        if progressive and "aggressive" in options:
            options["similarity_threshold"] = options.pop("aggressive")
        model = cls(build_llm(str(path / BASE_DIR)), compression_layers=[s["layer"] for s in stages],
                    use_progressive_compression=progressive, freeze_base=cfg["freeze_base"], **options)
        model.compression.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return model
