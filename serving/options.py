"""The model server's command-line options, kept light so that building `abloop`'s parser imports no torch."""

from __future__ import annotations

import argparse

from serving.model import DEFAULT_QUANTIZE, QUANTIZE_MODES
from store.runtime import DTYPES


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The model server's options, shared by ``python -m serving.server`` and ``abloop serve-model``."""
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--max-batch", type=int, default=16, help="1 switches batching off")
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=DEFAULT_QUANTIZE,
                        help="int8: decode steps of up to 4 rows read int8 weights (CPU; with bf16 weights, "
                        "a faster single stream; with fp32 weights, slower)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the base model's decode steps (no gain measured on CPU; "
                        "the first decode step compiles for minutes, and the first of a single request again)")
    parser.add_argument("--log-level", default=None, help="default: LOG_LEVEL (INFO)")
