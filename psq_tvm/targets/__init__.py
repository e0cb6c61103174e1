"""Targets: ``pim-psq`` (crossbar PIM with PSQ tables) and plain ``llvm`` host builds.

Importing this package registers the ``pim-psq`` target tag with TVM.
"""

from .pim_psq import SPEC_OPTIONS, TARGETS, build, spec_from_options
from .tag import TAG, register_tag

register_tag()

__all__ = ["SPEC_OPTIONS", "TAG", "TARGETS", "build", "register_tag", "spec_from_options"]
