"""``llava-deft viewer`` (issue 18 item 6): the runtime's trace of a prefill, the fates derived from it,
the HTTP API (schema, 400s naming the field, no path traversal, loopback only) and the page in a real
headless chromium driven by selenium.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/setup.sh`` installs them);
without them it FAILS naming the install command. ``LLAVA_DEFT_SKIP_BROWSER=1`` skips it explicitly.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from llava_deft.cli import main
from llava_deft.errors import InvalidArgumentError
from llava_deft.inference import load_model
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.model.llm import TINY_LLM
from llava_deft.model.llm.runtime import LLMStages, StageTrace
from llava_deft.modality import MEDIA_INPUTS
from llava_deft.viewer import ViewerSession, follow_tokens
from llava_deft.viewer.browser import BrowserMissingError, headless_chrome
from llava_deft.viewer.server import make_server
from pipeline.llm import TEXT_KIND

WINDOW, BUDGET, DROP = 8, 24, 0.5
PIPE = {"stages": [], "llm": [
    {"name": "pair_compress", "layer": 1, "window": WINDOW, "ratio": 0.5, "memory_floor": 0, "hidden_dim": 32, "num_heads": 4},
    {"name": "fastv", "layer": 2, "drop_ratio": DROP},
    {"name": "tova", "cache_max_size": BUDGET, "layers": [2, 3]},
]}
PROMPT = "what shape is this?"


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-layer tiny model with pair_compress after layer 0, fastv after layer 1 and TOVA on layers 2-3,
    saved and loaded back as a user would (``save_pretrained`` -> ``load_model``)."""
    root = tmp_path_factory.mktemp("viewer")
    torch.manual_seed(0)
    LlavaDeftForCausalLM({"llm": {"config": {**TINY_LLM, "num_hidden_layers": 4}}, "pipeline": PIPE}).save_pretrained(root / "m")
    picture().save(root / "x.png")
    return root / "m", root / "x.png", load_model(root / "m", device="cpu")


@pytest.fixture(scope="module")
def prompt(saved):
    """The LLM's inputs for PROMPT with one image: (embeds, mask, positions, kinds)."""
    api = saved[2]
    batch = api.build_batch([PROMPT], images=[[picture()]])
    with torch.no_grad():
        sp, _, _ = api.model.prepare_inputs(batch["input_ids"], batch["attention_mask"], padding_side="left",
                                            **{k: v for k, v in batch.items() if k in MEDIA_INPUTS})
    return sp.embeds, sp.attention_mask.bool(), sp.position_ids, sp.kinds


def recorded(api, prompt, stages=None):
    embeds, mask, positions, kinds = prompt
    runner = LLMStages(api.model.llm, list(stages if stages is not None else api.model.pipeline.llm), record=True)
    with torch.no_grad():
        logits, cache = api.model.llm(embeds, mask.long(), positions, use_cache=True, stages=runner, token_kinds=kinds)
    return runner, logits, cache


# ---------------------------------------------------------------- (a) the trace
def test_recording_is_off_by_default_and_changes_nothing(saved, prompt):
    api = saved[2]
    embeds, mask, positions, kinds = prompt
    stages = list(api.model.pipeline.llm)
    plain = LLMStages(api.model.llm, stages)
    assert plain.trace is None
    with torch.no_grad():
        logits, _ = api.model.llm(embeds, mask.long(), positions, use_cache=True, stages=plain, token_kinds=kinds)
    # off: no stage was asked for (or computed) an assignment
    assert all(s.last_assignment is None and s.record_assignment is False for s in stages[:2])
    runner, traced, _ = recorded(api, prompt)
    torch.testing.assert_close(traced, logits, rtol=0, atol=0)  # recording changes no number
    assert [(t.stage.stage_name, t.position, t.after_layer) for t in runner.trace] == [("pair_compress", 0, 0), ("fastv", 1, 1)]
    assert all(s.last_assignment is None and s.record_assignment is False for s in stages[:2])  # handed to the trace
    assert all(t.assignment is not None for t in runner.trace)


def test_assignment_derived_from_index_when_a_stage_gives_none():
    index_in, mask_in = torch.tensor([[0, 1, 2, 3, 4]]), torch.tensor([[False, True, True, True, True]])
    index, mask = torch.tensor([[-1, 2, 4]]), torch.tensor([[False, True, True]])
    rec = StageTrace(stage=None, position=0, after_layer=0, index_in=index_in, mask_in=mask_in, index=index, mask=mask,
                     positions=index.clamp(min=0), assignment=None)
    assert rec.columns().tolist() == [[-1, -1, 1, -1, 2]]  # present = kept (at its column), absent = dropped


def test_fates_per_layer_are_consistent(saved, prompt):
    api = saved[2]
    embeds, mask, positions, kinds = prompt
    runner, _, cache = recorded(api, prompt)
    pair, fastv = runner.trace
    n = int(mask.sum())
    layers = follow_tokens(runner.trace, 4, mask, positions, cache, {2: "tova", 3: "tova"})
    assert len(layers) == 4
    for lf in layers:
        assert len(lf.fate) == n and sum(lf.fate.count(f) for f in ("kept", "merged", "dropped", "evicted")) == n

    # layer 0 sees every token; no cache policy there: every KV head holds everything
    assert layers[0].fate == ["kept"] * n and layers[0].heads == [1.0] * n and layers[0].tokens == n

    # layer 1: pair_compress's merged groups are exactly its unexpanded memory pairs (lead + 2j, lead + 2j + 1)
    memory = n - WINDOW
    pairs = memory // 2
    lead = memory - 2 * pairs
    groups: dict[int, list[int]] = {}
    for t, g in enumerate(layers[1].group):
        if g is not None:
            groups.setdefault(g, []).append(t)
    expanded = int(pair.stage.expansions(torch.tensor([n - pairs]), torch.tensor([pairs]))[0])
    assert len(groups) == pairs - expanded > 0
    for g, members in groups.items():
        assert members == [g, g + 1] and (g - lead) % 2 == 0 and g + 1 < memory, members
    assert layers[1].fate.count("merged") == 2 * len(groups) and layers[1].fate.count("dropped") == 0
    assert layers[1].tokens == n - len(groups) == int(pair.mask.sum())
    assert all(layers[1].by[t] == "pair_compress" for m in groups.values() for t in m)

    # layer 2: fastv dropped exactly its budget of the media columns it saw (merged columns count once)
    media_in = int((kinds[0][pair.index[0][pair.mask[0]]] != TEXT_KIND).sum())
    budget = media_in - math.ceil(media_in * (1 - DROP) - 1e-9)
    cols = fastv.columns()[0][fastv.mask_in[0]]
    assert int((cols < 0).sum()) == budget > 0
    # fastv only drops: its own assignment equals the one derived from the output's index
    derived = StageTrace(**{**fastv.__dict__, "assignment": None}).columns()
    assert torch.equal(derived, fastv.assignment)
    gone = [t for t, f in enumerate(layers[2].fate) if f == "dropped"]
    assert all(layers[2].by[t] == "fastv" for t in gone)
    assert len({layers[1].group[t] if layers[1].group[t] is not None else -t - 1 for t in gone}) == budget

    # layers 2-3: TOVA holds BUDGET slots per KV head; a token is evicted when no head holds it
    for lf in layers[2:]:
        assert lf.cache_tokens == BUDGET < lf.tokens
        evicted = [t for t, f in enumerate(lf.fate) if f == "evicted"]
        assert evicted and all(lf.heads[t] == 0 and lf.by[t] == "tova" for t in evicted)
        assert all(lf.heads[t] > 0 for t, f in enumerate(lf.fate) if f in ("kept", "merged"))


# ---------------------------------------------------------------- (b) the HTTP API
@pytest.fixture(scope="module")
def server(saved):
    srv = make_server(ViewerSession(saved[2], max_text_chars=500))
    srv.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def call(server, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
    reply = conn.getresponse()
    payload = reply.read()
    conn.close()
    ctype = reply.getheader("Content-Type") or ""
    return reply.status, (json.loads(payload) if "json" in ctype else payload), ctype


def test_config_lists_each_stage_with_its_options_and_ranges(server):
    status, cfg, _ = call(server, "GET", "/api/config")
    assert status == 200 and cfg["layers"] == 4 and cfg["kv_heads"] == 2 and cfg["vision"] is True
    assert [(s["id"], s["name"], s["kind"]) for s in cfg["stages"]] == [
        ("0", "pair_compress", "layer"), ("1", "fastv", "layer"), ("2", "tova", "cache")]
    opts = {(s["name"], o["name"]): o for s in cfg["stages"] for o in s["options"]}
    want = {"type": "float", "value": DROP, "min": 0, "max": 1, "editable": True, "allowed": "a number in [0, 1]"}
    assert {k: opts[("fastv", "drop_ratio")][k] for k in want} == want
    assert opts[("fastv", "layer")]["min"] == 1 and opts[("fastv", "layer")]["max"] == 3  # runs between layers 0..3
    assert opts[("tova", "cache_max_size")]["allowed"] == "an integer > 0"
    assert opts[("pair_compress", "hidden_dim")]["editable"] is False  # another value: other learned shapes
    assert opts[("tova", "layers")]["type"] == "fixed"


def test_run_returns_tokens_fates_ratios_and_memory(server):
    status, out, _ = call(server, "POST", "/api/run", {"text": PROMPT, "image": data_url(picture())})
    assert status == 200, out
    n = out["prompt_tokens"]
    assert len(out["tokens"]) == n and [t["i"] for t in out["tokens"]] == list(range(n))
    images = [t for t in out["tokens"] if t["kind"] == "image"]
    assert len(images) == 64 and images[0]["text"] == "<img 0,0>" and images[9]["text"] == "<img 1,1>"
    assert "".join(t["text"] for t in out["tokens"] if t["kind"] == "text").count(PROMPT) == 1
    assert [L["layer"] for L in out["layers"]] == [0, 1, 2, 3]
    for L in out["layers"]:
        assert {"fate", "group", "by", "heads", "tokens", "ratio", "counts", "kv_bytes", "kv_bytes_without"} <= set(L)
        assert len(L["fate"]) == n and sum(L["counts"].values()) == n and L["ratio"] == pytest.approx(L["tokens"] / n)
    assert out["layers"][0]["ratio"] == 1 and out["layers"][2]["ratio"] < out["layers"][1]["ratio"] < 1
    assert out["layers"][2]["cache_ratio"] == pytest.approx(BUDGET / n)
    mem = out["memory"]
    assert 0 < mem["with_stages"] < mem["without_stages"] == sum(L["kv_bytes_without"] for L in out["layers"])
    assert mem["with_stages"] == sum(L["kv_bytes"] for L in out["layers"]) and "measured" in mem["method"]
    assert out["image"]["grid"] == [8, 8] and len(out["image"]["token_of_patch"]) == 64
    assert out["image"]["src"].startswith("data:image/png;base64,")
    assert [s["after_layer"] for s in out["stages"]] == [0, 1, None]

    # a changed option rebuilds the stage (same learned weights) and changes what the layer sees
    status, more, _ = call(server, "POST", "/api/run", {"text": PROMPT, "image": data_url(picture()),
                                                        "stages": {"1": {"drop_ratio": 0.9}}})
    assert status == 200 and more["layers"][2]["counts"]["dropped"] > out["layers"][2]["counts"]["dropped"]
    assert more["layers"][1] == out["layers"][1]  # the layers before fastv are untouched

    status, text_only, _ = call(server, "POST", "/api/run", {"text": PROMPT})
    assert status == 200 and text_only["image"] is None and all(t["kind"] == "text" for t in text_only["tokens"])


@pytest.mark.parametrize("body, field, says", [
    ({"text": "x", "stages": {"1": {"drop_ratio": 1.5}}}, "stages.1.drop_ratio", "a number in [0, 1]"),
    ({"text": "x", "stages": {"1": {"layer": 4}}}, "stages.1.layer", "an integer in [1, 3]"),
    ({"text": "x", "stages": {"2": {"cache_max_size": 0}}}, "stages.2.cache_max_size", "an integer > 0"),
    ({"text": "x", "stages": {"2": {"cache_max_size": 2.5}}}, "stages.2.cache_max_size", "must be an integer"),
    ({"text": "x", "stages": {"1": {"scoring": "best"}}}, "stages.1.scoring", "'attention', 'random'"),
    ({"text": "x", "stages": {"1": {"drop_ratio": "half"}}}, "stages.1.drop_ratio", "finite number"),
    ({"text": "x", "stages": {"7": {}}}, "stages.7", "0 (pair_compress)"),
    ({"text": "x", "stages": {"1": {"drop": 0.2}}}, "stages.1.drop", "drop_ratio"),
    ({"text": "x", "stages": {"0": {"hidden_dim": 64}}}, "stages.0.hidden_dim", "shapes of the stage's learned parameters"),
    ({"text": "x" * 501}, "text", "at most 500"),
    ({"text": 3}, "text", "must be a string"),
    ({"text": "x", "prompt": "y"}, "prompt", "'text', 'image', 'stages'"),
    ({"text": "x", "image": "data:image/png;base64,AAAA"}, "image", "cannot be decoded"),
    ({"text": "x", "image": "http://example.com/cat.png"}, "image", "data URL"),
    ({"text": "x", "image": "data:image/png;base64,###"}, "image", "not valid base64"),
])
def test_bad_requests_are_400_naming_the_field(server, body, field, says):
    status, out, _ = call(server, "POST", "/api/run", body)
    assert status == 400 and out["field"] == field and says in out["error"], out


def test_bad_bodies_methods_and_oversized_images(server, saved):
    status, out, _ = call(server, "POST", "/api/run", raw=b'{"text": NaN}')
    assert status == 400 and "NaN" in out["error"]
    status, out, _ = call(server, "POST", "/api/run", raw=b"{not json")
    assert status == 400 and out["field"] == "<body>"
    status, out, _ = call(server, "POST", "/api/run", raw=b'{"text": "x"}', headers={"Content-Type": "text/plain"})
    assert status == 415
    status, out, _ = call(server, "GET", "/api/run")
    assert status == 405 and out["allowed"] == ["POST"]
    status, out, _ = call(server, "POST", "/api/run", raw=b"x", headers={"Content-Length": str(10**9)})
    assert status == 413 and "over the limit" in out["error"]
    big = Image.new("RGB", (5000, 4000))
    status, out, _ = call(server, "POST", "/api/run", {"text": "x", "image": data_url(big)})
    assert status == 400 and out["field"] == "image" and "16,000,000 pixels" in out["error"]


@pytest.mark.parametrize("path", ["/static/../../pyproject.toml", "/static/..%2f..%2fpyproject.toml",
                                  "/static/%2e%2e/%2e%2e/pyproject.toml", "/../pyproject.toml", "/static//etc/passwd",
                                  "/static/../__init__.py", "/static/", "/etc/passwd", "/static/viewer.js/../../session.py"])
def test_no_path_traversal(server, path):
    status, out, _ = call(server, "GET", path)
    assert status == 404 and isinstance(out, dict) and "no such" in out["error"]


def test_page_and_static_files_are_served(server):
    status, page, ctype = call(server, "GET", "/")
    assert status == 200 and ctype.startswith("text/html") and b"/static/viewer.js" in page and b"http" not in page.split(b"<body>")[0]
    for name, kind in (("viewer.js", "text/javascript"), ("viewer.css", "text/css")):
        status, body, ctype = call(server, "GET", f"/static/{name}")
        assert status == 200 and ctype.startswith(kind) and b"https://" not in body  # nothing from a CDN


def test_loopback_only(server, saved, capsys):
    status, out, _ = call(server, "GET", "/api/config", headers={"Host": "evil.example:80"})
    assert status == 403 and out["field"] == "Host"
    with pytest.raises(InvalidArgumentError, match="--allow-remote"):
        make_server(ViewerSession(saved[2]), host="0.0.0.0")
    with pytest.raises(InvalidArgumentError, match="max_text_chars=0: give a positive integer"):
        ViewerSession(saved[2], max_text_chars=0)
    assert main(["viewer", "--model", str(saved[0]), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llava-deft viewer: --host '0.0.0.0' would serve the viewer beyond this machine") and "--allow-remote" in err


# ---------------------------------------------------------------- (c) a real browser
@pytest.fixture(scope="module")
def browser():
    if os.environ.get("LLAVA_DEFT_SKIP_BROWSER") == "1":
        pytest.skip("LLAVA_DEFT_SKIP_BROWSER=1: the browser test is skipped on purpose")
    try:
        drv = headless_chrome()
    except BrowserMissingError as err:  # never a silent skip: CI must install the browser
        pytest.fail(f"the viewer's browser test needs a headless chromium: {err}; or set LLAVA_DEFT_SKIP_BROWSER=1 "
                    f"to skip it explicitly", pytrace=False)
    yield drv
    drv.quit()


def wait_for(fn, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {fn}")


def test_page_in_a_headless_browser(server, browser, saved):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    find = browser.find_element
    browser.get(server.url)
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready === '1'"))
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#controls legend")] == [
        "0: pair_compress (layer stage)", "1: fastv (layer stage)", "2: tova (KV-cache policy)"]
    text = find(By.ID, "text")
    text.clear()
    text.send_keys(PROMPT)
    find(By.ID, "image").send_keys(str(saved[1]))  # the upload re-runs by itself (auto re-run)
    runs = lambda: int(find(By.ID, "status").get_attribute("data-run"))  # noqa: E731
    wait_for(lambda: runs() >= 1)
    find(By.ID, "run").click()
    wait_for(lambda: runs() >= 2)
    layer = find(By.ID, "layer")
    assert layer.get_attribute("value") == "3"  # the last layer is shown first
    dropped = len(browser.find_elements(By.CSS_SELECTOR, "#tokens .tok.fate-dropped"))
    merged = browser.find_elements(By.CSS_SELECTOR, "#tokens .tok.fate-merged")
    ratio = find(By.ID, "ratio-text").text
    assert dropped > 0 and merged and f"dropped {dropped}," in ratio, ratio
    assert merged[0].get_attribute("data-group") == merged[1].get_attribute("data-group")  # a pair shares its colour
    assert merged[0].value_of_css_property("background-color") == merged[1].value_of_css_property("background-color")
    assert "merged" in merged[0].get_attribute("title") and "pair_compress" in merged[0].get_attribute("title")
    assert find(By.ID, "image-panel").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar-tokens")) == 4
    assert "KV cache after the prefill" in find(By.ID, "memory").text

    # change fastv's drop_ratio: the page re-runs and shows more dropped tokens and another ratio
    box = find(By.ID, "opt-1-drop_ratio")
    box.clear()
    box.send_keys("0.9", Keys.TAB)
    wait_for(lambda: runs() >= 3)
    dropped_after = len(browser.find_elements(By.CSS_SELECTOR, "#tokens .tok.fate-dropped"))
    ratio_after = find(By.ID, "ratio-text").text
    assert dropped_after > dropped and ratio_after != ratio and f"dropped {dropped_after}," in ratio_after
    assert find(By.ID, "opt-1-drop_ratio-range").get_attribute("value") == "0.9"

    # the layer selector: layer 0 sees every token
    from selenium.webdriver.support.ui import Select

    Select(layer).select_by_value("0")
    assert not browser.find_elements(By.CSS_SELECTOR, "#tokens .tok.fate-dropped")
    assert find(By.ID, "ratio-text").text.startswith("layer 0:") and "(ratio 1.000)" in find(By.ID, "ratio-text").text

    # an out-of-range value: the server's 400 is shown, naming the field and the range
    box.clear()
    box.send_keys("2", Keys.TAB)
    error = wait_for(lambda: find(By.ID, "error").is_displayed() and find(By.ID, "error").text)
    assert "stages.1.drop_ratio" in error and "[0, 1]" in error
    assert "invalid" in box.get_attribute("class")


def test_a_missing_browser_names_the_install_command(monkeypatch):
    from llava_deft.viewer import browser as browser_module

    monkeypatch.setattr(browser_module.shutil, "which", lambda name: "/usr/bin/chromium" if name == "chromium" else None)
    with pytest.raises(BrowserMissingError, match=r"chromedriver not found on PATH; install them: apt-get install -y "
                                                  r"chromium chromium-driver"):
        headless_chrome()
