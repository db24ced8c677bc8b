"""``llava-deft viewer``: an interactive compression viewer in the browser (no Gradio, no CDN).

    llava-deft viewer --model runs/x/final [--pipeline configs/pipeline/fastv.yaml] [--port 0]

:mod:`.session` runs one traced prefill per request and says, per decoder layer, which prompt tokens the
LLM stages kept, merged, dropped or evicted (:mod:`.trace`); :mod:`.server` serves it and the page in
``static/`` over the standard library's ``http.server`` on 127.0.0.1.
"""

from .session import ViewerRequestError, ViewerSession
from .trace import FATES, LayerFates, follow_tokens

__all__ = ["FATES", "LayerFates", "ViewerRequestError", "ViewerSession", "follow_tokens"]
