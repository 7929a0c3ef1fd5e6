"""Everything about grammars: checking GBNF and JSON schemas from requests, and using them safely.

* ``grammar.request.grammar_for``: the grammar a completion request asks for, checked
  (call it before leasing the model).
* ``grammar.gbnf``: GBNF syntax check in Python, with line and column.
* ``grammar.schema``: JSON schema to GBNF for ``response_format`` and tool ``parameters``.
* ``grammar.checker.GrammarChecker``: llama.cpp's own compile in a helper process, with a
  time limit and a verdict cache; one per app.
* The grammar in the token loop (never NULL, never fed a token it refused) lives with the
  rest of sampling in ``engine.llama_adapter.SequenceSampler``.

Kept free of imports so that ``python -m grammar.helper`` starts without loading the server.
"""
