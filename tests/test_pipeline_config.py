"""Pipeline config validation, pinned by message (STYLE §6, §7), and the builder."""

import re
from pathlib import Path

import pytest
import torch

from pipeline import PipelineConfigError, TokenBatch, build_pipeline, list_stages, validate_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "pipeline"


def test_unknown_stage_lists_available_names():
    with pytest.raises(PipelineConfigError, match=r"stages\.0: unknown stage 'no_such_stage'\. Available: ") as e:
        validate_config([{"name": "no_such_stage"}])
    assert str(list_stages("tokens")) in str(e.value)
    with pytest.raises(PipelineConfigError, match=r"llm\.0: unknown stage 'no_such_stage'\. Available: ") as e:
        validate_config({"llm": [{"name": "no_such_stage"}]})
    assert str(list_stages("llm")) in str(e.value)


def test_stages_in_the_wrong_list_say_where_they_go():
    with pytest.raises(PipelineConfigError, match=r"stages\.0: stage 'tova' acts inside the LLM: list it under 'llm:'"):
        validate_config({"stages": [{"name": "tova"}]})
    with pytest.raises(PipelineConfigError, match=r"llm\.0: stage 'fgcs' acts on media tokens before the LLM"):
        validate_config({"llm": [{"name": "fgcs"}]})


def test_two_cache_policies_on_one_layer_are_refused():
    with pytest.raises(PipelineConfigError, match=r"llm\.1\.h2o: cache policies llm\.0 \('tova'\) and llm\.1 \('h2o'\) both cover \[1\]"):
        validate_config({"llm": [{"name": "tova", "layers": [0, 1]}, {"name": "h2o", "layers": [1, 2]}]})
    cfg = validate_config({"llm": [{"name": "tova", "layers": [0]}, {"name": "h2o", "layers": [1]}, {"name": "fastv", "layer": 1}]})
    assert [s.name for s in cfg.llm] == ["tova", "h2o", "fastv"]


def test_llm_stage_options_are_validated():
    with pytest.raises(PipelineConfigError) as e:
        validate_config({"llm": [{"name": "tova", "cache_max_size": 0, "head_strategy": "median"},
                                 {"name": "fastv", "drop_ratio": 1.5}]})
    text = str(e.value)
    assert "llm.0.tova.cache_max_size" in text and "llm.0.tova.head_strategy" in text and "llm.1.fastv.drop_ratio" in text


def test_stage_without_name():
    with pytest.raises(PipelineConfigError, match=r"stages\.0: each stage needs a 'name'"):
        validate_config({"stages": [{"retention_ratio": 0.5}]})


def test_unknown_key_names_stage_key_and_allowed_keys():
    cfg = {"stages": [{"name": "sam"}, {"name": "fgcs", "retention_ratoi": 0.5}]}
    with pytest.raises(
        PipelineConfigError,
        match=re.escape(
            "stages.1.fgcs.retention_ratoi: Extra inputs are not permitted "
            "(allowed keys of 'fgcs': ['alpha_var', 'explore_temperature', 'feedback_signal', 'feedback_target', 'feedback_top', 'feedback_weight', 'group_weight', 'hidden_dim', "
            "'merge_pruned', 'query_dim', 'query_init', 'query_keys', 'query_weight', 'retention_ratio', 'semantic_weight', 'text_k', 'video_radius'])"
        ),
    ):
        validate_config(cfg)


def test_unknown_top_level_key():
    with pytest.raises(PipelineConfigError, match=r"stage: .*a pipeline config has the keys 'stages' and 'llm'"):
        validate_config({"stages": [], "stage": []})


@pytest.mark.parametrize(
    "ratio, message",
    [(0, "Input should be greater than 0"), (1.5, "Input should be less than or equal to 1"), (-0.2, "Input should be greater than 0")],
)
@pytest.mark.parametrize("stage", ["fgcs", "random", "pool"])
def test_retention_ratio_out_of_range(stage, ratio, message):
    with pytest.raises(PipelineConfigError, match=rf"stages\.0\.{stage}\.retention_ratio: {message}"):
        validate_config([{"name": stage, "retention_ratio": ratio}])


def test_wrong_type():
    with pytest.raises(PipelineConfigError, match=r"stages\.0\.sam\.semantic_dim: Input should be a valid integer"):
        validate_config([{"name": "sam", "semantic_dim": "wide"}])
    with pytest.raises(PipelineConfigError, match=r"stages: Input should be a valid list"):
        validate_config({"stages": {"name": "fgcs"}})
    with pytest.raises(PipelineConfigError, match=r"<root>: expected a mapping with 'stages', got int"):
        validate_config(42)


def test_every_error_reported_at_once():
    cfg = [
        {"name": "sam", "semantic_dim": 0},
        {"name": "fgcs", "retention_ratio": 1.5, "hiden_dim": 8},
        {"name": "nope"},
    ]
    with pytest.raises(PipelineConfigError, match="has 4 error") as e:
        validate_config(cfg)
    assert [err.split(":")[0] for err in e.value.errors] == [
        "stages.0.sam.semantic_dim",
        "stages.1.fgcs.retention_ratio",
        "stages.1.fgcs.hiden_dim",
        "stages.2",
    ]


def test_missing_yaml_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(FileNotFoundError, match=re.escape(f"pipeline config file '{missing}' does not exist")):
        validate_config(missing)


def test_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - name: fgcs\n   retention_ratio: [0.5\n")
    with pytest.raises(PipelineConfigError, match=rf"(?s)pipeline config '{re.escape(str(bad))}' .*<file>: not valid YAML"):
        validate_config(bad)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("stages:\n  - name: random\n    seeds: 3\n")
    with pytest.raises(PipelineConfigError, match=rf"(?s)'{re.escape(str(path))}' has 1 error.*stages\.0\.random\.seeds"):
        validate_config(path)


def test_bare_list_and_empty_config_accepted(tmp_path):
    assert [s.name for s in validate_config([{"name": "sam"}, {"name": "random"}]).stages] == ["sam", "random"]
    bare = tmp_path / "bare.yaml"
    bare.write_text("- name: pool\n  retention_ratio: 0.5\n")
    assert validate_config(bare).stages[0].retention_ratio == 0.5
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert validate_config(empty).stages == []
    assert validate_config(None).stages == []


def test_every_shipped_pipeline_yaml_validates_and_builds():
    paths = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert {p.stem for p in paths} >= {"none", "fgcs", "random", "pool", "deft", "deft_nofb"}, [p.name for p in paths]
    for path in paths:
        pipe = build_pipeline(path, dim=16).eval()
        # encoder_attention and the prompt's query as the model gives them when a stage asks (visionzip, fgcs)
        batch = TokenBatch.from_tokens(torch.randn(1, 16, 16), layout=(1, 4, 4), encoder_attention=torch.rand(1, 16),
                                       query=torch.randn(1, 5, 16))
        out = pipe(batch)
        assert out.mask.sum() <= 16


def test_builder_passes_feature_width_to_later_stages():
    with_sam = build_pipeline([{"name": "sam", "semantic_dim": 24}, {"name": "random"}, {"name": "fgcs"}], dim=16)
    assert with_sam.stages[2].saliency[0].in_features == 24
    alone = build_pipeline([{"name": "fgcs", "hidden_dim": 8}], dim=16)
    assert alone.stages[0].saliency[0].in_features == 16
    assert alone.stages[0].saliency[0].out_features == 8


def test_set_retention_changes_kept_count_and_config():
    pipe = build_pipeline(CONFIG_DIR / "fgcs.yaml", dim=16).eval()
    batch = TokenBatch.from_tokens(torch.randn(2, 40, 16))
    assert pipe(batch).mask.sum(1).tolist() == [20, 20]  # ceil(0.482 * 40)
    pipe.set_retention(0.1)
    assert pipe(batch).mask.sum(1).tolist() == [4, 4]
    assert pipe.config.stages[1].retention_ratio == 0.1
    assert build_pipeline(pipe.config.model_dump(), dim=16).stages[1].retention_ratio == 0.1


@pytest.mark.parametrize("ratio", [0, 1.5])
def test_set_retention_rejects_out_of_range(ratio):
    pipe = build_pipeline([{"name": "random"}], dim=16)
    with pytest.raises(ValueError, match=re.escape(f"retention ratio must be in (0, 1], got {ratio}")):
        pipe.set_retention(ratio)
    assert pipe.stages[0].retention_ratio == 0.482


def test_set_retention_without_reducer():
    with pytest.raises(ValueError, match=re.escape("no stage of pipeline ['sam'] has a retention_ratio to set")):
        build_pipeline([{"name": "sam"}], dim=16).set_retention(0.5)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: p.stem)
def test_config_round_trips(path):
    cfg = build_pipeline(path, dim=16).config
    dumped = cfg.model_dump()
    rebuilt = build_pipeline(dumped, dim=16)
    assert rebuilt.config == cfg
    assert rebuilt.config.model_dump() == dumped
    assert rebuilt.names == [s["name"] for s in dumped["stages"]]
