"""tunelab: adapt large language models to a domain, offline, on plain Hugging Face models."""

import os

# Offline by construction: nothing in tunelab may reach a hub. Set before transformers is imported.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tunelab.errors import ConfigError, DataError, ModelError, TunelabError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["TunelabError", "ConfigError", "DataError", "ModelError", "__version__"]
