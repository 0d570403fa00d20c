"""Which install extra provides each optional module, so a command run without it says what to install in one line.

A plain ``pip install pickscore`` is the client side; ``pyproject.toml`` declares the extras this table names.
"""

from __future__ import annotations

# Top-level module -> the extra that installs it (the first that does, for modules several extras share).
EXTRA_OF = {
    "torch": "serve",
    "torchvision": "serve",
    "PIL": "serve",
    "regex": "serve",
    "safetensors": "serve",
    "huggingface_hub": "serve",
    "pyarrow": "serve",
    "matplotlib": "serve",
    "grpc_reflection": "serve",
    "prometheus_client": "serve",
    "tritonclient": "serve",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "jinja2": "collect",
    "sqlalchemy": "collect",
    "alembic": "collect",
    "psycopg": "postgres",
    "ray": "ray",
}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """A one-line message naming the extra that installs the missing module, or None when no extra does."""
    module = (error.name or "").partition(".")[0]
    extra = EXTRA_OF.get(module)
    if extra is None:
        return None
    return f"this needs the '{extra}' extra ({module} is not installed): pip install 'pickscore[{extra}]'"
