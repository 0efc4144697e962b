"""burnish: fine-tune and run language and vision-language models on MLX.

`import burnish` routes float32 matmuls to an optimised BLAS on Linux CPU
(see `burnish.backend`) before anything imports `mlx.core`; every other name
is imported lazily so that `import burnish` stays cheap.
"""

from . import backend as _backend

_backend.route_blas()

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "FastModel": "loading",
    "FastLanguageModel": "loading",
    "from_pretrained": "loading",
    "generate": "generation",
    "stream_generate": "generation",
    "GenerationChunk": "generation",
    "FastVisionModel": "vision",
    "find_norms": "precision",
    "is_norm": "precision",
    "norm_parameter_paths": "precision",
    "apply_architecture_norms": "precision",
    "checkpoint_dtypes": "precision",
    "training_precision": "precision",
    "get_peft_model": "peft",
    "load_rows": "data",
    "format_examples": "data",
    "save_adapters": "export",
    "load_adapters": "export",
    "save_merged": "export",
    "export_gguf": "export",
    "Trainer": "trainer",
    "TrainingConfig": "trainer",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'burnish' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
