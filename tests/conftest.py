import burnish  # noqa: F401  (first: routes BLAS before anything imports mlx.core)
import mlx.core as mx
import pytest
import tiny


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Build (once per session) a tiny HF folder for (model_type, dtype)."""
    cache = {}

    def make(model_type="llama", dtype=mx.bfloat16, **overrides):
        key = (model_type, str(dtype), tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{model_type}-{str(dtype).split('.')[-1]}-{len(cache)}"
            cache[key] = tiny.build(tmp_path_factory.mktemp("models") / name,
                                    model_type, dtype=dtype, **overrides)
        return cache[key]

    return make
