"""Plain helpers shared by the test modules (``tests/`` is put on ``sys.path`` by ``tests/conftest.py``).

Fixtures live in the ``conftest.py`` files; what is here is ordinary code that fixtures, module-level
constants, hypothesis tests and child processes use too: tiny models and tokenizers
(:mod:`helpers.models`), the attention reference and a SequenceKV driver (:mod:`helpers.sequences`),
hand-made session records (:mod:`helpers.records`) and CLI assertions (:mod:`helpers.cli`).
"""
