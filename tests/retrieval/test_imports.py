from __future__ import annotations

import subprocess
import sys


def test_importing_retrieval_is_light() -> None:
    code = (
        "import sys\n"
        "import retrieval, retrieval.index, retrieval.embedder, retrieval.chunker, retrieval.corpus,"
        " retrieval.build, retrieval.fetch\n"
        "heavy = {'torch', 'faiss', 'sentence_transformers', 'trafilatura', 'transformers'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_retrieval_does_not_import_other_packages() -> None:
    code = (
        "import sys\n"
        "import retrieval.build, retrieval.fetch\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'proxy', 'flows', 'training', 'serving'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
