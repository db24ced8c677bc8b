"""A screenshot of ``llava-deft viewer`` taken by a real headless chromium (selenium).

    .venv/bin/python scripts/viewer_screenshot.py                       # random-init demo model
    .venv/bin/python scripts/viewer_screenshot.py --model runs/x/final --pipeline configs/pipeline/fastv.yaml

Without ``--model`` the model is the tiny default (8 x 8 image tokens) with a 4-layer LLM and three LLM
stages -- pair_compress after layer 0, fastv after layer 1, TOVA on layers 2-3 -- randomly initialised
from seed 0 and saved to a temporary folder: the picture shows what the page looks like, not what a
trained model keeps. The image is easy-VQA test image ``--index``. Serves the page in-process on a free
loopback port, types the prompt, uploads the image, picks ``--layer`` and writes ``--out``.
Needs chromium + chromedriver (``scripts/setup.sh``) and the dev extra (selenium).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llava_deft.data import EasyVQADataset  # noqa: E402
from llava_deft.inference import load_model  # noqa: E402
from llava_deft.model import LlavaDeftForCausalLM  # noqa: E402
from llava_deft.model.llm import TINY_LLM  # noqa: E402
from llava_deft.viewer import ViewerSession  # noqa: E402
from llava_deft.viewer.browser import headless_chrome  # noqa: E402
from llava_deft.viewer.server import make_server  # noqa: E402

DEMO_PIPELINE = {"stages": [], "llm": [
    {"name": "pair_compress", "layer": 1, "window": 12, "ratio": 0.5, "memory_floor": 0, "hidden_dim": 64, "num_heads": 4},
    {"name": "fastv", "layer": 2, "drop_ratio": 0.5},
    {"name": "tova", "cache_max_size": 32, "layers": [2, 3]},
]}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a saved model directory (default: the random-init demo model)")
    p.add_argument("--pipeline", default=None, help="pipeline YAML whose llm: stages the page controls (with --model)")
    p.add_argument("--text", default="What shape is in the image, and what colour is it?", help="the prompt text")
    p.add_argument("--index", type=int, default=0, help="which easy-VQA test question's image to upload")
    p.add_argument("--layer", type=int, default=2, help="the decoder layer the page shows")
    p.add_argument("--out", default=str(ROOT / "eval/results/viewer.png"), help="PNG to write")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            torch.manual_seed(0)
            model_dir = Path(tmp) / "model"
            LlavaDeftForCausalLM({"llm": {"config": {**TINY_LLM, "num_hidden_layers": 4}},
                                  "pipeline": DEMO_PIPELINE}).save_pretrained(model_dir)
        image = Path(tmp) / "image.png"
        EasyVQADataset("test", limit=args.index + 1)[args.index]["images"][0].save(image)
        server = make_server(ViewerSession(load_model(model_dir, device="cpu", pipeline=args.pipeline)))
        server.start()
        driver = headless_chrome(1400, 1150)
        try:
            driver.get(server.url)
            _wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"))
            box = driver.find_element("id", "text")
            box.clear()
            box.send_keys(args.text)
            driver.find_element("id", "image").send_keys(str(image))  # the upload runs the model
            _wait(lambda: driver.find_element("id", "status").get_attribute("data-run") != "0")
            driver.execute_script("document.getElementById('layer').value = arguments[0];"
                                  "document.getElementById('layer').dispatchEvent(new Event('change'));", args.layer)
            time.sleep(0.5)  # the image panel draws when its PNG has decoded
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
            print(f"wrote {out}: {driver.find_element('id', 'ratio-text').text}")
        finally:
            driver.quit()
            server.shutdown()
            server.server_close()
    return out


def _wait(fn, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not fn():
        if time.time() > end:
            raise TimeoutError(f"the viewer page did not get there in {timeout:g} s")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
