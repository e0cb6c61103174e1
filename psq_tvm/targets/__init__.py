"""Targets: ``pim-psq`` (crossbar PIM with PSQ tables) and plain ``llvm`` host builds."""

from .pim_psq import SPEC_OPTIONS, TAG, TARGETS, build, register_tag, spec_from_options

__all__ = ["SPEC_OPTIONS", "TAG", "TARGETS", "build", "register_tag", "spec_from_options"]
