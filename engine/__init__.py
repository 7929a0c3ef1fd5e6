"""The engine: each loaded model runs in its own worker process, serving several sequences at once.

* ``protocol``: the messages between the server process and a worker.
* ``client``: the server side, ``Worker`` (start, load, generate, embed, close, crash detection).
* ``worker``: the worker process's entry point.
* ``scheduler``: the worker's slot loop (continuous batching, chunked prefill, prompt cache).
* ``llama_adapter``: the one module that touches llama-cpp-python's private parts.
* ``text``: incremental UTF-8 decoding and stop strings.

Nothing here imports Flask or the server's modules, so a worker starts with only llama_cpp to import.
"""
