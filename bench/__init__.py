"""Benchmarks of llama-cpp-server against llama-cpp-python run in-process.

``python -m bench`` starts our server in a subprocess, measures each figure by
interleaving the server side with an in-process baseline (A B A B ...), prints a
table and writes ``bench/results/<figure>.json``. See ``bench/README.md``.
"""
