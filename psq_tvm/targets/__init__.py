"""Targets: ``pim-psq`` (crossbar PIM with PSQ tables) and plain ``llvm`` host builds.

Importing this package registers the ``pim-psq`` target tag with TVM.
"""

from .pim_psq import SPEC_OPTIONS, TARGETS, build, spec_from_options
from .pipeline import STAGES, CompileContext, CompileOptions, Pipeline
from .tag import TAG, register_tag

register_tag()

__all__ = ["CompileContext", "CompileOptions", "Pipeline", "SPEC_OPTIONS", "STAGES", "TAG", "TARGETS", "build",
           "register_tag", "spec_from_options"]
