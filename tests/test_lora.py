"""LoRA / QLoRA (``stages.N.lora``, ``llava_deft/train/lora.py``) and ``projector_lr``.

One real run of the training entry (2 LoRA steps on easy-VQA, CPU) exports plain weights that
``llava_deft.load_model`` loads; the stage set-up, parameter groups, the merge and the config errors
are checked on the functions that entry calls.
"""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_deft.config import load_model_config, load_train_config
from llava_deft.config.train import LoraSpec
from llava_deft.errors import ConfigError
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.model.llm import TINY_LLM, DecoderLM, build_llm
from llava_deft.train.lora import add_lora, merged_state_dict, parameter_counts
from llava_deft.train.trainer import check_stages, param_groups, stage_model

ROOT = Path(__file__).resolve().parent.parent
PIPE = "model.pipeline.stages=[{name: sam, semantic_dim: 32}, {name: fgcs, retention_ratio: 0.5, hidden_dim: 32}]"
STAGE = "stages=[{freeze_vision: true, lr: 1.0e-3, projector_lr: 1.0e-2, warmup_ratio: 0, lora: {r: 4, alpha: 8}}]"


def lora_recipe(*extra: str):
    return load_train_config(ROOT / "configs/train/easyvqa_lora.yaml", [PIPE, STAGE, *extra])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """2 LoRA steps through ``python -m llava_deft.train`` (about 15 s on 2 CPU cores)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    cmd = [sys.executable, "-m", "llava_deft.train", "--config", "configs/train/easyvqa_lora.yaml", "--output_dir", str(out),
           "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "data.limit=8", PIPE, STAGE]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return out, res.stdout


@pytest.mark.slow
def test_lora_run_exports_plain_weights_that_load_and_generate(lora_run):
    import llava_deft

    out, stdout = lora_run
    cfg = lora_recipe()
    state = load_file(str(out / "final" / "model.safetensors"))
    assert not [k for k in state if "lora_" in k or "base_layer" in k]
    torch.manual_seed(cfg.seed)  # the run's init: same seed, same config
    net = LlavaDeftForCausalLM(cfg.model)
    init = net.state_dict()
    assert set(state) == set(init)  # the plain model's keys, nothing more, nothing less
    # frozen under LoRA: embeddings, norms, head and the (frozen) vision tower keep their init;
    # the adapters were folded into every linear layer of the LLM, which therefore moved
    frozen = [k for k in init if k.startswith("vision.") or re.search(r"embed_tokens|norm|lm_head", k)]
    assert frozen and all(torch.equal(state[k], init[k]) for k in frozen)
    linear = [k for k in init if re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", k)]
    assert len(linear) == 7 * net.llm.num_layers and all(not torch.equal(state[k], init[k]) for k in linear)

    model = llava_deft.load_model(out / "final", device="cpu")
    assert type(model.model.llm.hf).__name__ == "LlamaForCausalLM"
    assert isinstance(model.generate("what color is the shape?", max_new_tokens=3), str)

    stage = json.loads((out / "final" / "training.json").read_text())["stages"][0]
    assert 0 < stage["trainable_params"] < stage["total_params"]
    assert stage["trainable_share"] == stage["trainable_params"] / stage["total_params"]
    assert stage["lora"]["r"] == 4 and stage["lora"]["bits"] is None
    assert [(g["name"], g["lr"]) for g in stage["param_groups"]] == [("base", 1e-3), ("projector", 1e-2)]
    assert f"{stage['trainable_params'] / 1e6:.2f}M of {stage['total_params'] / 1e6:.2f}M params trainable" in stdout
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["projector_lr"] == pytest.approx(10 * r["lr"]) for r in log) and log[0]["lr"] > 0


def test_lora_stage_trains_only_adapters_projector_and_pipeline():
    cfg = lora_recipe()
    model = stage_model(cfg, 0, cfg.stages[0], None)
    assert type(model.llm.hf).__name__ == "LlamaForCausalLM"  # injected in place: our layer loop still finds its parts
    assert type(model.llm.hf.model.layers[0].self_attn.q_proj).__module__.startswith("peft.tuners.lora")
    trainable = {re.sub(r"\.\d+\.", ".N.", n) for n, p in model.named_parameters() if p.requires_grad}
    adapters = {f"llm.hf.model.layers.N.{m}.lora_{ab}.default.weight" for ab in "AB"
                for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    own = {re.sub(r"\.\d+\.", ".N.", n) for part in ("projector", "pipeline")
           for n, _ in getattr(model, part).named_parameters(prefix=part)}
    assert trainable == adapters | own
    n_train, n_total = parameter_counts(model)
    assert n_train == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_total == sum(p.numel() for p in model.parameters())
    # the layer loop runs on the wrapped LLM and the adapters get gradients
    ids = torch.randint(0, 100, (2, 6))
    logits, _ = model.llm(model.llm.embed(ids), None, torch.arange(6).expand(2, 6))
    logits.sum().backward()
    b = model.llm.hf.model.layers[0].self_attn.q_proj.lora_A.default.weight
    assert b.grad is not None and model.llm.hf.model.layers[0].self_attn.q_proj.base_layer.weight.grad is None


def test_projector_and_pipeline_get_projector_lr():
    cfg = lora_recipe()
    model = stage_model(cfg, 0, cfg.stages[0], None)
    groups = param_groups(model, cfg.stages[0])
    assert [(g["name"], g["lr"]) for g in groups] == [("base", 1e-3), ("projector", 1e-2)]
    fast = {id(p) for part in (model.projector, model.pipeline) for p in part.parameters()}
    assert {id(p) for p in groups[1]["params"]} == fast
    assert {id(p) for p in groups[0]["params"]} == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    opt = torch.optim.AdamW(groups, lr=cfg.stages[0].lr)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]
    # without projector_lr one group at lr; a stage where only projector and pipeline train has one group too
    plain = lora_recipe("stages.0.projector_lr=null")
    assert [(g["name"], g["lr"], len(g["params"])) for g in param_groups(model, plain.stages[0])] == [
        ("all", 1e-3, len(groups[0]["params"]) + len(groups[1]["params"]))]
    align = lora_recipe("stages.0.lora=null", "stages.0.freeze_llm=true")
    frozen = stage_model(align, 0, align.stages[0], None)
    assert [(g["name"], g["lr"]) for g in param_groups(frozen, align.stages[0])] == [("projector", 1e-2)]


def test_merged_weight_is_base_plus_scale_times_b_a():
    torch.manual_seed(0)
    lm = DecoderLM(build_llm(TINY_LLM, vocab_size=300))
    plain_keys = set(lm.state_dict())
    add_lora(lm, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # B starts at zero; make the delta non-trivial
    q = lm.hf.model.layers[1].self_attn.q_proj
    reference = q.base_layer.weight + (8 / 4) * q.lora_B.default.weight @ q.lora_A.default.weight
    merged = merged_state_dict(lm, {k: v.clone() for k, v in lm.state_dict().items()})
    assert set(merged) == plain_keys
    torch.testing.assert_close(merged["hf.model.layers.1.self_attn.q_proj.weight"], reference, rtol=0, atol=1e-6)
    unwrapped = lm.state_dict()["hf.model.layers.1.self_attn.k_proj.weight"]  # not a target: unchanged
    assert torch.equal(merged["hf.model.layers.1.self_attn.k_proj.weight"], unwrapped)
    # the same as peft's own merge_and_unload
    from peft.tuners.lora import LoraLayer

    ref = copy.deepcopy(lm)
    for m in ref.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    peft_merged = {k.replace(".base_layer", ""): v for k, v in ref.state_dict().items() if "lora_" not in k}
    assert set(peft_merged) == plain_keys
    for k in plain_keys:
        torch.testing.assert_close(merged[k], peft_merged[k], rtol=0, atol=1e-6)


def test_lora_config_errors_name_every_key_with_its_path():
    bad = "stages=[{lora: {rank: 8, r: 0, dropout: 1.5, bits: 8, target_modules: []}}, {lora: {quant_type: fp4}}]"
    with pytest.raises(ConfigError) as err:
        load_train_config(None, [bad])
    msg = str(err.value)
    assert "has 7 error(s)" in msg
    for line in ["stages.0.lora.rank: Extra inputs are not permitted",
                 "stages.0.lora.r: Input should be greater than 0",
                 "stages.0.lora.dropout: Input should be less than 1",
                 "stages.0.lora.bits: Input should be 4",
                 "stages.0.lora.target_modules.list[constrained-str]: List should have at least 1 item",
                 "stages.1.lora: Value error, quant_type set without bits: 4 (4-bit base weights only); set bits: 4 or remove them"]:
        assert line in msg, msg
    with pytest.raises(ConfigError, match=r"stages\.0: Value error, lora trains the LLM through adapters, so freeze_llm: true contradicts it"):
        load_train_config(None, ["stages=[{freeze_llm: true, lora: {}}]"])
    cfg = lora_recipe("stages.0.lora.target_modules=[q_proj, qkv]")
    with pytest.raises(ConfigError, match=r"stages\.0\.lora\.target_modules: \['qkv'\] name no linear layer of the LLM; "
                                          r"its linear layers are \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"):
        stage_model(cfg, 0, cfg.stages[0], None)


def test_the_command_line_lists_every_bad_lora_key_with_its_path():
    from llava_deft.train.trainer import parse_args, resolve_config

    args, overrides = parse_args(["--config", "configs/train/easyvqa_lora.yaml", "stages.0.lora.rank=8", "stages.0.lora.alpha=-1"])
    with pytest.raises(ConfigError, match=r"(?s)has 2 error\(s\):.*stages\.0\.lora\.alpha: Input should be greater than 0"
                                          r".*stages\.0\.lora\.rank: Extra inputs are not permitted"):
        resolve_config(args, overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_without_cuda_is_a_config_error():
    cfg = lora_recipe("stages.0.lora.bits=4")
    with pytest.raises(ConfigError, match=r"stages\.0\.lora\.bits: 4 \(QLoRA\) cannot run: no CUDA device here"):
        check_stages(cfg, load_model_config(cfg.model))
    with pytest.raises(ConfigError, match=r"stages\.0\.lora\.bits: 4 \(QLoRA\) cannot run: no CUDA device here"):
        stage_model(cfg, 0, cfg.stages[0], None)
    zero3 = lora_recipe("stages.0.lora.bits=4", "deepspeed=configs/deepspeed/zero3.json")
    with pytest.raises(ConfigError, match=r"4-bit weights cannot be partitioned by ZeRO-3"):
        check_stages(zero3, load_model_config(zero3.model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' 4-bit layers need CUDA")
def test_qlora_merge_folds_adapters_into_dequantized_weights():
    pytest.importorskip("bitsandbytes")
    from peft.utils.integrations import dequantize_module_weight

    torch.manual_seed(0)
    lm = DecoderLM(build_llm(TINY_LLM, vocab_size=300, torch_dtype=torch.bfloat16))
    plain_keys = set(lm.state_dict())
    add_lora(lm, LoraSpec(r=4, alpha=8, bits=4, target_modules=["q_proj"]), torch.bfloat16, torch.device("cuda"))
    lm.cuda()
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    q = lm.hf.model.layers[0].self_attn.q_proj
    assert type(q.base_layer).__name__ == "Linear4bit"
    reference = dequantize_module_weight(q.base_layer).float() + 2 * (q.lora_B.default.weight @ q.lora_A.default.weight).float()
    ids = torch.randint(0, 300, (2, 8), device="cuda")
    logits, _ = lm(lm.embed(ids), None, torch.arange(8, device="cuda").expand(2, 8))
    logits.float().sum().backward()
    assert q.lora_A.default.weight.grad is not None
    merged = merged_state_dict(lm, dict(lm.state_dict()))
    assert set(merged) == plain_keys  # 4-bit layers without an adapter (k_proj, ...) are dequantised too
    assert all(v.dtype != torch.uint8 for v in merged.values())
    torch.testing.assert_close(merged["hf.model.layers.0.self_attn.q_proj.weight"], reference.cpu(), rtol=0, atol=1e-2)


def test_bench_qlora_smoke_runs_lora_and_reports_qlora_not_run(tmp_path):
    res = subprocess.run([sys.executable, "eval/bench_qlora.py", "--smoke", "--out-dir", str(tmp_path)], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads((tmp_path / "qlora_smoke_cpu.json").read_text())
    lora = out["modes"]["lora"]
    assert len(lora["losses"]) == 3 and all(torch.isfinite(torch.tensor(lora["losses"])))
    assert 0 < lora["trainable_params"] < lora["total_params"] and len(lora["step_s"]) == 3
    assert out["modes"]["qlora"]["not_run"].startswith("not run: needs CUDA + bitsandbytes")
    assert out["device"].startswith("CPU") and out["commit"] and out["date"]
    md = (tmp_path / "qlora_smoke_cpu.md").read_text()
    assert "| qlora | not run: needs CUDA + bitsandbytes" in md and "| lora | float32 |" in md
