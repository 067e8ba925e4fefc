"""The command-line layer: the only place that turns a blueprint into a RunSpec.

``python -m nanodecoder.run``, ``nanodecoder.sample``, ``nanodecoder.eval``,
``nanodecoder.finetune.answer`` and ``tools/param_count.py`` are thin files that
call the ``main`` of a module here.
"""
