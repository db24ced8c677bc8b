"""The registry derives each stage's Config from its ``__init__`` signature (STYLE §1, §5, §6).

``SEED_DEFAULTS`` is written out by hand on purpose: it is the seed's value of every option of
every registered stage, so a default that drifts (or a stage registered without its row here)
fails a test instead of silently changing what a run means.
"""

import inspect
import re
from typing import Annotated, Literal

import pytest
import torch
from pydantic import Field, ValidationError
from torch import nn

import pipeline.registry as registry
from pipeline import (
    DeFTModule,
    PipelineConfigError,
    StageConfig,
    UnknownStageError,
    build_pipeline,
    deft_pipeline_config,
    get_stage,
    list_stages,
    register,
    stage_defaults,
    validate_config,
)
from pipeline.stages.fgcs import FGCS
from pipeline.stages.random import RandomReducer
from pipeline.types import Ratio

SEED_DEFAULTS = {
    "sam": {"semantic_dim": 512},
    "fgcs": {
        "retention_ratio": 0.482,
        "hidden_dim": 256,
        "semantic_weight": 1.0,
        "group_weight": 0.5,
        "feedback_weight": 1.0,
        "feedback_signal": "l1",  # sum_d |g_d x_d|; "dot" (|sum_d g_d x_d|) cancels (eval/needle_recall.py)
        "feedback_target": "scaled",  # importance / the row's max (the seed's); "top": the top feedback_top share = 1
        "feedback_top": 0.25,
        "alpha_var": 0.1,
        "text_k": 5,
        "video_radius": 2,
        "explore_temperature": 0.0,
        "merge_pruned": False,
        "query_weight": 0.0,  # question-aware saliency off: DeFT exactly
        "query_dim": 64,
        "query_keys": "input",  # W_k on the scorer's input (sam features), drawn independently of W_q
        "query_init": "random",
    },
    "rtd": {"mode": "fast", "bottleneck_ratio": 4, "recover_ratio": 0.25, "adaptive_threshold": 0.5, "recon_weight": 1.0},
    "random": {"retention_ratio": 0.482, "seed": 0},
    "pool": {"retention_ratio": 0.25},
    "tome": {"retention_ratio": 0.25, "use_features": False},
    "divprune": {"retention_ratio": 0.25, "use_features": False},
    "visionzip": {"retention_ratio": 0.111, "dominant_share": 54 / 64, "dominance": "encoder"},
    # stages inside the LLM (pipeline/llm.py)
    "fastv": {"layer": 2, "drop_ratio": 0.5, "num_queries": 1, "scoring": "attention", "seed": 0},
    "tova": {"cache_max_size": 512, "layers": None, "head_strategy": "mean", "per_kv_head": True,
             "entropy_weight": 0.0, "head_weight_lr": 0.1, "history_every": 1, "debug": False},
    "h2o": {"cache_max_size": 512, "layers": None, "recent_ratio": 0.5},
    "snapkv": {"cache_max_size": 512, "layers": None, "window_size": 32, "kernel_size": 5},
    "streaming_llm": {"cache_max_size": 512, "layers": None, "num_sinks": 4},
    # seed 002's facade: ModelWrapperPretrained(model, layer_idx=[10], T_w=100, r=0.8, M=100)
    "pair_compress": {"layer": 10, "window": 100, "ratio": 0.8, "memory_floor": 100, "hidden_dim": None, "num_heads": 8},
    # seeds 001 / 003 (issue 18): floor 0.85, attention share 0.3, margin 0.2, contrastive weight 0.1
    "recursive_compression": {
        "similarity_threshold": 0.85, "adaptive_threshold": True, "threshold_std": 1.0, "max_offset": 0.1,
        "modulator_dim": 64, "use_residuals": True, "contrastive_margin": 0.2, "contrastive_weight": 0.1,
        "projection_dim": 128, "max_cluster_size": None, "proportional_attention": True, "within_frames": False},
    "recursive_compression_llm": {
        "layer": 2, "similarity_threshold": 0.85, "attention_weight": 0.3, "num_queries": 8,
        "adaptive_threshold": True, "threshold_std": 1.0, "max_offset": 0.1, "modulator_dim": 64,
        "use_residuals": True, "contrastive_margin": 0.2, "contrastive_weight": 0.1, "projection_dim": 128,
        "max_cluster_size": None, "tokens": "media"},
    "progressive_compression": {
        "layer": 2, "conservative": 0.95, "moderate": 0.9, "aggressive": 0.8, "attention_weight": 0.3,
        "num_queries": 8, "adaptive_threshold": True, "threshold_std": 1.0, "max_offset": 0.1,
        "modulator_dim": 64, "use_residuals": True, "contrastive_margin": 0.2, "contrastive_weight": 0.1,
        "projection_dim": 128, "max_cluster_size": None, "tokens": "media"},
}


def seed_defaults(name: str) -> dict:
    if name not in SEED_DEFAULTS:
        pytest.fail(f"stage {name!r} is registered but has no row in SEED_DEFAULTS; add its seed defaults "
                    f"(today {stage_defaults(name)}) to tests/test_pipeline_registry.py")
    return SEED_DEFAULTS[name]


@pytest.fixture
def scratch_registry():
    """Register throwaway stages freely; the registry is restored afterwards."""
    saved = dict(registry._STAGES)
    yield
    registry._STAGES.clear()
    registry._STAGES.update(saved)


# ------------------------------------------------------------------------------ seed defaults
@pytest.mark.parametrize("name", list_stages())
def test_stage_defaults_are_the_seeds(name):
    assert stage_defaults(name) == seed_defaults(name)
    # the types match too (0.0 vs 0, False vs 0 compare equal)
    assert {k: type(v) for k, v in stage_defaults(name).items()} == {k: type(v) for k, v in seed_defaults(name).items()}


@pytest.mark.parametrize("name", list_stages())
def test_constructor_signature_is_the_declaration(name):
    cls = get_stage(name)
    params = inspect.signature(cls.__init__).parameters
    options = {k: p.default for k, p in params.items() if k not in ("self", *registry.BUILDER_ARGS)}
    assert options == seed_defaults(name)
    config = cls.Config
    assert issubclass(config, StageConfig)
    assert list(config.model_fields) == ["name", *options]  # signature order, name first
    assert config.model_fields["name"].annotation == Literal[name] and config().name == name
    assert config.model_config["extra"] == "forbid" and config.model_config["frozen"]
    with pytest.raises(ValidationError, match="frozen"):
        config().name = "other"
    assert "Config" not in {k for klass in cls.__mro__[1:] for k in vars(klass)}, "no hand-written nested Config"


def test_missing_seed_row_is_named(scratch_registry):
    @register("scratch_no_row")
    class NoRow(nn.Module):
        def __init__(self, dim: int, width: int = 3):
            super().__init__()

    with pytest.raises(pytest.fail.Exception, match=r"stage 'scratch_no_row' is registered but has no row in SEED_DEFAULTS; add its seed defaults \(today \{'width': 3\}\)"):
        seed_defaults("scratch_no_row")


def test_stage_defaults_is_a_fresh_dict_and_names_unknown_stages():
    d = stage_defaults("fgcs")
    d["retention_ratio"] = 0.1
    assert stage_defaults("fgcs")["retention_ratio"] == 0.482
    with pytest.raises(UnknownStageError, match=re.escape(f"unknown stage 'no_such_stage'. Available: {list_stages()}")):
        stage_defaults("no_such_stage")


def test_stages_take_plain_arguments():
    fgcs = FGCS(dim=32, retention_ratio=0.3)
    assert fgcs.retention_ratio == 0.3 and fgcs.alpha_var == 0.1 and fgcs.saliency[0].in_features == 32
    assert RandomReducer().retention_ratio == 0.482
    with pytest.raises(ValueError, match="semantic_weight > 0 or group_weight > 0"):  # cross-field checks stay in __init__
        FGCS(dim=8, semantic_weight=0.0, group_weight=0.0)


def test_literal_options_keep_their_choices():
    assert get_stage("rtd").Config.model_fields["mode"].annotation == Literal["fast", "hybrid", "adaptive"]
    with pytest.raises(PipelineConfigError, match=r"stages\.0\.rtd\.mode: Input should be 'fast', 'hybrid' or 'adaptive'"):
        validate_config([{"name": "rtd", "mode": "slow"}])


# ---------------------------------------------------------------- constraints from the signature
@pytest.mark.parametrize(
    "stage, key, value, message",
    [
        ("fgcs", "retention_ratio", 1.5, "Input should be less than or equal to 1"),
        ("fgcs", "hidden_dim", 0, "Input should be greater than 0"),
        ("fgcs", "alpha_var", -0.1, "Input should be greater than or equal to 0"),
        ("fgcs", "text_k", -1, "Input should be greater than or equal to 0"),
        ("sam", "semantic_dim", 0, "Input should be greater than 0"),
        ("rtd", "bottleneck_ratio", 1, "Input should be greater than 1"),
        ("rtd", "recover_ratio", 0, "Input should be greater than 0"),
        ("pool", "retention_ratio", 2, "Input should be less than or equal to 1"),
        ("random", "seed", "x", "Input should be a valid integer"),
    ],
)
def test_signature_constraints_are_validated(stage, key, value, message):
    with pytest.raises(PipelineConfigError, match=rf"stages\.0\.{stage}\.{key}: {message}"):
        validate_config([{"name": stage, key: value}])


def test_a_scratch_stage_is_validated_and_built_from_its_signature(scratch_registry):
    @register("scratch_ok")
    class Scratch(nn.Module):
        def __init__(self, dim: int, retention_ratio: Ratio = 0.5, kind: Literal["a", "b"] = "a", feature_dim: int | None = None):
            super().__init__()
            self.retention_ratio, self.kind, self.dim = retention_ratio, kind, dim

        def forward(self, batch):
            return batch

    assert stage_defaults("scratch_ok") == {"retention_ratio": 0.5, "kind": "a"}
    stage = build_pipeline([{"name": "scratch_ok", "kind": "b"}], dim=8).stages[0]
    assert (stage.retention_ratio, stage.kind, stage.dim) == (0.5, "b", 8)
    with pytest.raises(PipelineConfigError, match=r"stages\.0\.scratch_ok\.retention_ratio: Input should be less than or equal to 1"):
        validate_config([{"name": "scratch_ok", "retention_ratio": 1.5}])
    with pytest.raises(PipelineConfigError, match=re.escape("stages.0.scratch_ok.kindd: Extra inputs are not permitted (allowed keys of 'scratch_ok': ['kind', 'retention_ratio'])")):
        validate_config([{"name": "scratch_ok", "kindd": "a"}])


# --------------------------------------------------------------- ill-declared options raise at register
def _no_annotation(self, dim, width=3): ...
def _no_default(self, dim: int, width: int): ...
def _var_kwargs(self, dim: int, width: int = 3, **options): ...
def _field_default(self, dim: int, width: int = Field(3, gt=0)): ...
def _bad_default(self, dim: int, width: Annotated[int, Field(gt=0)] = 0): ...
def _reserved(self, dim: int, name: str = "x"): ...


@pytest.mark.parametrize(
    "init, message",
    [
        (_no_annotation, r"option 'width' needs a type annotation"),
        (_no_default, r"option 'width' needs a default"),
        (_var_kwargs, r"parameter 'options' must be an ordinary keyword option, not variadic keyword"),
        (_field_default, r"option 'width' has a pydantic Field as its default; put the constraint in the annotation"),
        (_bad_default, r"a default breaks its own constraint: width=0: Input should be greater than 0"),
        (_reserved, r"parameter 'name' is reserved"),
    ],
    ids=["no_annotation", "no_default", "var_kwargs", "field_default", "bad_default", "reserved_name"],
)
def test_ill_declared_option_is_a_type_error_at_register(scratch_registry, init, message):
    cls = type("Bad", (nn.Module,), {"__init__": init})
    with pytest.raises(TypeError, match=rf"^stage 'scratch_bad' \(.*Bad\.__init__\): {message}"):
        register("scratch_bad")(cls)
    assert "scratch_bad" not in list_stages()  # nothing half-registered


def test_hand_written_config_is_rejected(scratch_registry):
    class Twice(nn.Module):
        class Config(StageConfig):
            width: int = 3

        def __init__(self, dim: int, width: int = 3):
            super().__init__()

    with pytest.raises(TypeError, match=r"stage 'scratch_twice' .*: remove the nested `Config` class; options are declared once"):
        register("scratch_twice")(Twice)


def test_duplicate_name_and_double_registration_raise(scratch_registry):
    with pytest.raises(ValueError, match=r"stage name 'fgcs' is already registered by pipeline\.stages\.fgcs\.FGCS"):
        register("fgcs")(type("Other", (nn.Module,), {}))
    with pytest.raises(ValueError, match=r"FGCS is already registered as stage 'fgcs'"):
        register("fgcs_again")(FGCS)


# ------------------------------------------------------------------------- DeFT reads the stages
def test_deft_defaults_come_from_the_stages():
    sam, fgcs, rtd = stage_defaults("sam"), stage_defaults("fgcs"), stage_defaults("rtd")
    expected = {"semantic_dim": sam["semantic_dim"], "retention_ratio": fgcs["retention_ratio"], "enable_rtd": True,
                "alpha_var": fgcs["alpha_var"], "rtd_bottleneck_ratio": rtd["bottleneck_ratio"]}
    for fn in (deft_pipeline_config, DeFTModule.__init__):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in expected} == expected, fn.__qualname__
    # the docstrings name the values
    for value in (sam["semantic_dim"], fgcs["retention_ratio"], fgcs["alpha_var"], rtd["bottleneck_ratio"]):
        assert str(value) in deft_pipeline_config.__doc__ and str(value) in DeFTModule.__doc__


def test_deft_config_unchanged_from_the_seed():
    assert deft_pipeline_config() == {"stages": [
        {"name": "sam", "semantic_dim": 512},
        {"name": "fgcs", "retention_ratio": 0.482, "alpha_var": 0.1},
        {"name": "rtd", "bottleneck_ratio": 4},
    ]}
    assert deft_pipeline_config(semantic_dim=64, enable_rtd=False, group_weight=0.0) == {"stages": [
        {"name": "sam", "semantic_dim": 64},
        {"name": "fgcs", "retention_ratio": 0.482, "alpha_var": 0.1, "group_weight": 0.0},
    ]}
    torch.manual_seed(0)
    deft = DeFTModule(token_dim=16)
    assert deft.pipeline.names == ["sam", "fgcs", "rtd"]
    assert (deft.sam.feature_dim_out, deft.fgcs.retention_ratio, deft.fgcs.alpha_var, deft.rtd.bottleneck_dim) == (512, 0.482, 0.1, 4)
