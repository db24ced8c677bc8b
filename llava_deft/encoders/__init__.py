"""Modality encoders and their preprocessing: ``image`` (timm ViT / open_clip visual tower + transform),
``video`` (decord reading, frame sampling, per-frame pooling), ``audio`` (wav/flac loading, Whisper
log-mel features, Whisper-style encoder), ``weights`` (local safetensors only), ``stream`` (bounded
token memories of long streams, compressed by a KV-cache policy). Lazy exports."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "build_image_encoder": ".image", "ImageEncoder": ".image",
    "load_video": ".video", "VideoClip": ".video", "frames_to_pixels": ".video", "pool_frame_tokens": ".video",
    "sample_frame_indices": ".video",
    "load_audio": ".audio", "AudioEncoder": ".audio", "AudioProcessor": ".audio",
    "read_safetensors": ".weights",
    "StreamMemory": ".stream", "EncoderMemory": ".stream", "stream_batch": ".stream",
})
__all__ = __dir__()
