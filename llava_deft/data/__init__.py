"""Data: datasets (``easyvqa``, ``llava_json``, ``passkey`` on the fly, ``sources``: a recipe's data and
mixes), LLaVA record validation (``records``) and the collator (``collate``: one ``build_collator``
for training, inference and eval). Lazy exports."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "EasyVQADataset": ".easyvqa", "export_easyvqa": ".easyvqa", "easyvqa_question_types": ".easyvqa",
    "EASYVQA_SHAPES": ".easyvqa",
    "LlavaJsonDataset": ".llava_json", "parse_llava_record": ".records", "LLAVA_ROLES": ".records",
    "PasskeyDataset": ".passkey", "build_dataset": ".sources", "MixedDataset": ".sources",
    "MultimodalCollator": ".collate", "build_collator": ".collate", "build_generation_inputs": ".collate",
    "LRUCache": ".collate", "pad_sequences": ".collate", "IGNORE_INDEX": ".collate",
})
__all__ = __dir__()
