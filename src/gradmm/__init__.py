"""gradmm: synthetic text whose training gradient matches a (private) released target (GRADMM).

The public API, importable from here (loaded on first use, so that ``import gradmm`` stays
light)::

    from gradmm import GenerateConfig, ReleaseConfig, Runtime, generate, release_targets

The layout (``docs/design.md``): ``core`` the maths, ``models`` where models come from, ``data``
tasks and the private pool, ``privacy`` accounting, noise and audits, ``stages`` the pipeline,
``experiments`` grids of runs and their reports, ``cli`` the commands.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "Runtime": "gradmm.core.settings",
    "SolverConfig": "gradmm.core.settings",
    "ReleaseConfig": "gradmm.stages.configs",
    "GenerateConfig": "gradmm.stages.configs",
    "FilterConfig": "gradmm.stages.configs",
    "FinetuneConfig": "gradmm.stages.configs",
    "EvaluateConfig": "gradmm.stages.configs",
    "release_targets": "gradmm.stages.release",
    "load_release": "gradmm.stages.record",
    "generate": "gradmm.stages.generate",
    "filter_run": "gradmm.stages.filtering",
    "finetune": "gradmm.stages.finetune",
    "evaluate_task": "gradmm.stages.evaluate",
    "run_experiment": "gradmm.experiments.runner",
    "load_model": "gradmm.models.loading",
    "load_task": "gradmm.data.tasks",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gradmm' has no attribute {name!r}")
