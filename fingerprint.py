"""``system_fingerprint``: one value per build of this server and version of llama.cpp.

OpenAI documents the fingerprint as the backend configuration a reply was made with, for
telling apart changes that affect determinism under a fixed ``seed``. Here that is our own
code (the token loop, sampling, templates) plus llama-cpp-python, which pins llama.cpp.
It is computed once at import: hashing files per request would cost for nothing, and a
running process keeps the code it started with anyway.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import llama_cpp

_SOURCES = Path(__file__).resolve().parent


def _compute() -> str:
    digest = hashlib.sha256(f"llama-cpp-python {llama_cpp.__version__}\n".encode())
    for source in sorted(_SOURCES.glob("*.py")):
        digest.update(source.name.encode() + b"\n" + source.read_bytes())
    return "fp_" + digest.hexdigest()[:10]


SYSTEM_FINGERPRINT = _compute()
