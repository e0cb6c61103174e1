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
    (``rows=256, adc_bits=None, weight_bits="2-8"``, ...), and every field of
    :class:`psq_tvm.targets.pipeline.CompileOptions`: ``objective`` ('mse' | 'cdf-kl'), ``granularity``
    ('column' | 'tile'), ``rounding`` ('balanced' | 'nearest'), ``budget`` ('auto' (default) | 'avg-bits=4.5' | 'crossbars=N' | 'reduction=3.5'),
    ``tolerance``, ``bits``, ``min_fidelity`` (what auto must meet, e.g. '23,rtn8-2'), ``calib_inputs``
    ({input name: array [n, ...]}: the fidelity guard measures on them), ``sensitivity`` / ``bias_correction``
    ('none' | 'synthetic' | 'bn' | 'bn+synthetic' | 'calib'), ``emit_c_header``, ``fold_batchnorm``, ``float_weights``;
    plus ``progress`` / ``warn`` (callables taking a message) and ``pipeline`` (your own
    :class:`~psq_tvm.targets.pipeline.Pipeline`).  With ``output`` the package is also written there
    (atomically).
    """
    from .runtime.files import OutputPathError, check_output_path
    from .targets.pim_psq import build

    if output is not None:
        try:
            check_output_path(output, "output")        # before the compile, not after it
        except OutputPathError as e:
            raise PackageError(str(e)) from None
    if "preset" in options:
        options["preset_name"] = options.pop("preset")
    pkg = build(model_or_path, target, **options)
    if output is not None:
        pkg.save(output)
    return pkg


def load(path: str | os.PathLike, expect_digest: str | None = None) -> Package:
    """Load and validate a package written by :func:`compile` or ``tvmc compile`` (nothing in it is executed).

    ``expect_digest``: the sha256 (hex) of the whole .tar that compile printed; a package with another one
    is refused with :class:`~psq_tvm.runtime.package.DigestMismatch`."""
    return _load(path, expect_digest)


__all__ = ["Package", "PackageError", "compile", "load"]
