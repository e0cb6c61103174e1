"""Python API: ``psq_tvm.compile(model, target="pim-psq", **options)`` and ``psq_tvm.load(path)``."""

from __future__ import annotations

import os
from typing import Any

from .runtime.package import Package, PackageError
from .runtime.package import load as _load


def compile(model_or_path: Any, target: str = "pim-psq", *, output: str | os.PathLike | None = None,
            **options: Any) -> Package:  # noqa: A001 (mirrors tvm.compile)
    """Compile an ONNX model (path, bytes or ``onnx.ModelProto``) into a :class:`~psq_tvm.package.Package`.

    Options: ``input_shapes`` ({name: shape} or ``"input:[1,3,224,224]"``), ``preset`` (crossbar
    preset name), ``spec`` (a :class:`~psq_tvm.CrossbarSpec`), any CrossbarSpec field
    (``rows=256, adc_bits=None, weight_bits="2-8"``, ...), ``objective`` ('mse' | 'cdf-kl'),
    ``budget`` ('avg-bits=4.5' | 'crossbars=N' | 'reduction=3.5'), ``tolerance``, ``bits``,
    ``granularity`` ('tile' | 'column'), ``sensitivity`` ('none' | 'synthetic' | 'bn'), ``bias_correction``
    ('bn' (default): DFQ bias correction from the model's BatchNorm statistics, a no-op without
    BatchNorm | 'synthetic': from synthetic input means | 'none'),
    ``emit_c_header``, ``fold_batchnorm`` (fold inference BatchNorm into the preceding conv, default
    True), ``float_weights`` (store the original weights for ``mode="float"``,
    default True), ``progress`` (a callable taking a message).  With ``output`` the package is
    also written there (atomically).
    """
    from .targets.pim_psq import build

    if "preset" in options:
        options["preset_name"] = options.pop("preset")
    pkg = build(model_or_path, target, **options)
    if output is not None:
        pkg.save(output)
    return pkg


def load(path: str | os.PathLike) -> Package:
    """Load and validate a package written by :func:`compile` or ``tvmc compile``."""
    return _load(path)


__all__ = ["Package", "PackageError", "compile", "load"]
