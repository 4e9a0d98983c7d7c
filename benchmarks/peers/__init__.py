"""The peers benchmark: hkv beside the caches a user would otherwise pick, at equal device memory.

Not part of the hkv package: it runs hkv through its public API only. ``run.py`` builds the
prompts, runs the methods and writes the figures (``python benchmarks/peers/run.py --help``);
``methods.py`` holds the methods run in this environment (hkv, transformers' caches);
``child.py`` is the script run in kvpress's own virtualenv. ``hkv bench plot`` draws its JSON.
"""
