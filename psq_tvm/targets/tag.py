"""The ``pim-psq`` target tag: ``tvm.target.Target("pim-psq")`` is an ``llvm`` target with keys
``pim_psq, cpu`` (TVM 0.27 cannot add target kinds from Python; tags it can)."""

from __future__ import annotations

TAG = "pim-psq"


def register_tag() -> None:
    """Register the ``pim-psq`` target tag (idempotent)."""
    import tvm
    from tvm.target import tag

    try:
        tvm.target.Target(TAG)
        return
    except Exception:
        pass
    tag.register_tag(TAG, {"kind": "llvm", "keys": ["pim_psq", "cpu"]})
