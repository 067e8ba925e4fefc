"""The library's top, under the command line: what a Python program calls.

:func:`load` reads a trained run back (model and tokenizer, ``loading.py``); ``blueprint.py`` holds a whole
blueprint's declared top level (:class:`RunSpec`) and its loading, ``catalog.py`` every registered kind,
``run.py`` one run's lifecycle (prepare -> plan -> train) and ``preflight.py`` its checks before step 1.  This
package gathers every other one (a blueprint names kinds of all of them); only ``cli/`` and the root package
(``nanodecoder.load``) import it.
"""
from .blueprint import RunSpec, load_blueprint, run_spec
from .loading import LoadedRun, load, load_run_model

__all__ = ["LoadedRun", "RunSpec", "load", "load_blueprint", "load_run_model", "run_spec"]
