"""A tiny random Llama with SmolLM2's tokenizer, for the demo's whole-path test (fast on CPU)."""

from tests.training.conftest import base_model_dir, tiny_model_dir  # noqa: F401
