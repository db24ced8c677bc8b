"""``DeFTModule``: the DeFT seed's module API as a facade over the ``sam -> fgcs -> rtd`` stages.

    deft = DeFTModule(token_dim=256)                     # the stages' defaults: semantic_dim=512, ...
    out = deft(tokens=x, modality="image", spatial_shape=(16, 16))     # x (B, 256, 256) or (256, 256)
    out["retained_tokens"], out["retained_indices"]

The same stages are what ``use_deft: true`` in a model config (or ``configs/pipeline/deft.yaml``)
builds, so a model trained through the config can be driven through this API and back.

The seed's knobs default to the stages' own defaults (:func:`pipeline.stage_defaults`, read once
at import), so the values are declared in one place, the stages' ``__init__`` signatures, and
still show in ``inspect.signature`` here.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import stages as _stages  # noqa: F401  (the defaults below are read from the registered stages)
from .batch import Modality, TokenBatch
from .builder import build_pipeline
from .registry import stage_defaults

MODALITIES = {"image": Modality.IMAGE, "video": Modality.VIDEO, "audio": Modality.AUDIO, "text": Modality.TEXT}
INFERENCE_MODES = ("fast", "hybrid", "adaptive")

_SAM, _FGCS, _RTD = stage_defaults("sam"), stage_defaults("fgcs"), stage_defaults("rtd")


def deft_pipeline_config(
    semantic_dim: int = _SAM["semantic_dim"],
    retention_ratio: float = _FGCS["retention_ratio"],
    enable_rtd: bool = True,
    alpha_var: float = _FGCS["alpha_var"],
    rtd_bottleneck_ratio: int = _RTD["bottleneck_ratio"],
    **fgcs_options: Any,
) -> dict:
    """The pipeline config of DeFT with the seed's knobs: ``sam -> fgcs [-> rtd]``.

    Defaults are the stages' own: ``semantic_dim`` = sam's ``semantic_dim`` (512),
    ``retention_ratio`` and ``alpha_var`` = fgcs's (0.482, 0.1), ``rtd_bottleneck_ratio`` = rtd's
    ``bottleneck_ratio`` (4). The knobs are always written into the config, so it reads the same
    as the seed's. ``fgcs_options`` go to the ``fgcs`` stage (e.g. ``group_weight``, ``feedback_weight``).
    """
    stages: list[dict] = [
        {"name": "sam", "semantic_dim": semantic_dim},
        {"name": "fgcs", "retention_ratio": retention_ratio, "alpha_var": alpha_var, **fgcs_options},
    ]
    if enable_rtd:
        stages.append({"name": "rtd", "bottleneck_ratio": rtd_bottleneck_ratio})
    return {"stages": stages}


def layout_for(modality: str, spatial_shape: tuple[int, ...] | None, n: int) -> tuple[int, int, int]:
    """``(T, H, W)`` from the seed's ``spatial_shape``: image ``(H, W)``, video ``(T, H, W)``,
    audio ``(T,)``, text ``None``. Raises ``ValueError`` when it does not cover ``n`` tokens."""
    if modality == "text" or spatial_shape is None:
        if modality in ("image", "video"):
            raise ValueError(f"modality {modality!r} needs spatial_shape ((H, W) for image, (T, H, W) for video)")
        layout = (1, 1, n) if modality == "text" else (n, 1, 1)
    else:
        shape = tuple(int(s) for s in spatial_shape)
        expected = {"image": 2, "video": 3, "audio": 1}[modality]
        if len(shape) != expected:
            raise ValueError(
                f"spatial_shape for {modality} must have {expected} entries "
                f"({ {'image': '(H, W)', 'video': '(T, H, W)', 'audio': '(T,)'}[modality] }), got {shape}"
            )
        layout = {1: lambda s: (s[0], 1, 1), 2: lambda s: (1, *s), 3: lambda s: s}[expected](shape)
    if layout[0] * layout[1] * layout[2] != n:
        raise ValueError(f"spatial_shape {spatial_shape} covers {layout[0] * layout[1] * layout[2]} tokens, but tokens has {n}")
    return layout


class DeFTModule(nn.Module):
    """DeFT with the seed's signature: SAM (``semantic_dim``) -> FGCS (``retention_ratio``,
    ``alpha_var``) -> RTD (``rtd_bottleneck_ratio``, when ``enable_rtd``).

    Defaults are the stages' own, as in :func:`deft_pipeline_config` (today 512, 0.482, 0.1, 4).

    ``forward(tokens, modality, spatial_shape, task_loss, inference_mode, mask)`` returns a dict:

    - ``retained_tokens`` (B, K, D): what the LLM would see (kept, plus recovered ones in hybrid /
      adaptive), in original order; ``retained_indices`` (B, K) their original positions;
      ``retained_mask`` (B, K) bool (rows may differ in length); ``scores`` (B, K);
    - ``pruned_indices`` (B, P) and ``pruned_mask`` (B, P): the tokens left out;
    - ``losses``: auxiliary losses to add to the training loss (``rtd_recon`` in training, and
      ``fgcs_feedback`` when ``task_loss`` is given); ``aux_loss``: their sum (0 when none);
    - ``stats``: per-stage token counts.

    For 2-D ``tokens (N, D)`` the outputs drop the batch dimension. ``task_loss`` (optional, as in
    the seed): a loss whose graph contains ``tokens``; its gradient × input becomes the saliency
    head's target. Without it, in training, the feedback is captured from whatever backward the
    caller runs through ``retained_tokens`` (see :class:`pipeline.stages.fgcs.FGCS`). ``query (B, Q, D)``
    / ``(Q, D)`` and ``query_mask``: the question's embeddings, for ``query_weight`` > 0 (fgcs's
    question-aware saliency; e.g. ``DeFTModule(token_dim, query_weight=1.0)``).
    """

    def __init__(
        self,
        token_dim: int,
        semantic_dim: int = _SAM["semantic_dim"],
        retention_ratio: float = _FGCS["retention_ratio"],
        enable_rtd: bool = True,
        alpha_var: float = _FGCS["alpha_var"],
        rtd_bottleneck_ratio: int = _RTD["bottleneck_ratio"],
        **fgcs_options: Any,
    ):
        super().__init__()
        self.token_dim = token_dim
        self.enable_rtd = enable_rtd
        cfg = deft_pipeline_config(semantic_dim, retention_ratio, enable_rtd, alpha_var, rtd_bottleneck_ratio, **fgcs_options)
        self.pipeline = build_pipeline(cfg, dim=token_dim)

    @property
    def sam(self) -> nn.Module:
        return self.pipeline.stages[0]

    @property
    def fgcs(self) -> nn.Module:
        return self.pipeline.stages[1]

    @property
    def rtd(self) -> nn.Module | None:
        return self.pipeline.stages[2] if self.enable_rtd else None

    def forward(
        self,
        tokens: Tensor,
        modality: Literal["image", "video", "audio", "text"] = "image",
        spatial_shape: tuple[int, ...] | None = None,
        task_loss: Tensor | None = None,
        inference_mode: Literal["fast", "hybrid", "adaptive"] = "fast",
        mask: Tensor | None = None,
        query: Tensor | None = None,
        query_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; choose one of {sorted(MODALITIES)}")
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(f"unknown inference_mode {inference_mode!r}; choose one of {list(INFERENCE_MODES)}")
        if inference_mode != "fast" and self.rtd is None:
            raise ValueError(f"inference_mode {inference_mode!r} needs RTD; build DeFTModule(enable_rtd=True)")
        unbatched = tokens.dim() == 2
        x = tokens.unsqueeze(0) if unbatched else tokens
        if x.dim() != 3 or x.shape[-1] != self.token_dim:
            raise ValueError(f"tokens must be (B, N, {self.token_dim}) or (N, {self.token_dim}), got {tuple(tokens.shape)}")
        m = None if mask is None else (mask.unsqueeze(0) if unbatched else mask)
        n_real = x.shape[1] if m is None else None
        if m is not None and not bool((m.sum(1) == m.sum(1)[0]).all()):
            raise ValueError("DeFTModule takes one spatial_shape for the batch: every row needs the same number of real tokens")
        layout = layout_for(modality, spatial_shape, n_real if n_real is not None else int(m[0].sum()))
        q = None if query is None else (query.unsqueeze(0) if unbatched else query)
        qm = None if query_mask is None else (query_mask.unsqueeze(0) if unbatched else query_mask)
        batch = TokenBatch.from_tokens(x, m, modality=MODALITIES[modality], layout=layout, query=q, query_mask=qm)
        if self.rtd is not None:
            self.rtd.set_mode(inference_mode)
        out = self.pipeline(batch)

        losses = dict(out.losses)
        if task_loss is not None:
            feats = self.sam(batch)
            logits = self.fgcs.saliency_logits(feats)
            losses["fgcs_feedback"] = self.fgcs.feedback_loss_from(task_loss, x, logits, batch.mask)
        aux = sum(losses.values(), torch.zeros((), device=x.device))
        pruned = out.pruned
        result = {
            "retained_tokens": out.tokens,
            "retained_indices": out.index,
            "retained_mask": out.mask,
            "scores": out.scores,
            "pruned_indices": pruned.index if pruned is not None else out.index.new_zeros(out.index.shape[0], 0),
            "pruned_mask": pruned.mask if pruned is not None else out.mask.new_zeros(out.mask.shape[0], 0),
            "losses": losses,
            "aux_loss": aux,
            "stats": out.stats,
        }
        if unbatched:
            for k in ("retained_tokens", "retained_indices", "retained_mask", "scores", "pruned_indices", "pruned_mask"):
                if result[k] is not None:
                    result[k] = result[k][0]
        return result
