"""The ``hkv`` command and the programs it runs: ``app`` (typer: config, sessions, demo, chat),
``bench`` (the ``hkv bench`` sub-app, in :mod:`hkv.bench.cli`), ``demo`` and ``chat``."""
