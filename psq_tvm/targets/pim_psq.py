"""The ``pim-psq`` target: its options (a crossbar preset + overrides) and :func:`build`.

``tvm.target.Target("pim-psq")`` is an ``llvm`` target with keys ``pim_psq, cpu`` (:mod:`.tag`).  The
crossbar options are not part of the target string: they come from a preset plus
``--target-pim-psq-<option>`` overrides (old tvmc style), see :func:`spec_from_options`.  The compile
itself is the stage pipeline of :mod:`.pipeline`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..core.crossbar import DEFAULT_PRESET, CrossbarSpec, SpecError, parse_bits, preset
from .pipeline import TARGETS  # noqa: F401  (the target names, re-exported for the CLI)
from .tag import TAG

#: crossbar options settable with --target-pim-psq-<option> (CLI spelling uses '-')
SPEC_OPTIONS = tuple(f.name for f in dataclasses.fields(CrossbarSpec) if f.name != "name")


def _convert(field: str, value: Any) -> Any:
    if field == "weight_bits":
        return parse_bits(value) if isinstance(value, str) else tuple(int(b) for b in value)
    if field == "adc_bits":
        if value is None or str(value).lower() in ("none", "lossless"):
            return None
        if str(value).strip() == "0":
            raise SpecError("--target-pim-psq-adc-bits 0: an ADC needs at least 1 bit; give 1..32, or 'none' "
                            "for a lossless ADC")
    if field in ("encoding", "adc_range"):
        return str(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SpecError(f"--target-pim-psq-{field.replace('_', '-')} expects an integer, got {value!r}") from None


def spec_from_options(preset_name: str | None = None, **overrides: Any) -> CrossbarSpec:
    """A crossbar spec from a preset name plus option overrides (strings accepted, as from the CLI)."""
    clean = {k: _convert(k, v) for k, v in overrides.items() if v is not None}
    unknown = set(clean) - set(SPEC_OPTIONS)
    if unknown:
        raise SpecError(f"unknown crossbar option(s) {sorted(unknown)}; known: {list(SPEC_OPTIONS)}")
    return preset(preset_name or DEFAULT_PRESET, **clean)


def build(model_or_path: Any, target: str = TAG, *, preset_name: str | None = None, spec: CrossbarSpec | None = None,
          progress: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None,
          pipeline: Any = None, **options: Any):
    """Compile an ONNX model for ``pim-psq`` (or a plain ``llvm`` host build); returns a Package.

    ``preset_name`` plus crossbar-field overrides (``rows=256``, ``adc_bits="none"``, ...) or a ``spec``
    give the crossbar model; every other keyword is a :class:`~psq_tvm.targets.pipeline.CompileOptions`
    field.  Runs :class:`~psq_tvm.targets.pipeline.Pipeline` (``pipeline``: your own stages).
    """
    from .pipeline import CompileOptions, build as run_pipeline, require_c_compiler

    require_c_compiler()                       # before the compile, not after it
    fields = {f.name for f in dataclasses.fields(CompileOptions)}
    overrides = {k: options.pop(k) for k in list(options) if k not in fields}
    spec = spec.replace(**{k: _convert(k, v) for k, v in overrides.items() if v is not None}) if spec \
        else spec_from_options(preset_name, **overrides)
    return run_pipeline(model_or_path, target, progress=progress, warn=warn, pipeline=pipeline, spec=spec, **options)
