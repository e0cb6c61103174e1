"""Functional crossbar simulator: one PIM layer, computed the way the crossbars would.

The simulator reads a layer's weights **only** from the crossbar cell tables
(``cells``: uint8 ``[n_crossbars, R, C]``, see :mod:`psq_tvm.core.tables`) and the
layer's tile metadata (a manifest layer entry, see :func:`layer_program`), so
running it verifies the tables themselves.  It imports numpy and psq_tvm.core only (no TVM).

What one call computes (DESIGN.md section 6), for an input ``x``:

1. **Activations** (:mod:`.activations`) to ``a = options.act_bits or spec.act_bits`` bits, the
   range taken from ``x`` itself at run time.  Unsigned input: ``q_x`` in ``[0, 2**a - 1]``, input
   offset ``o_x = 0``.  Signed input: ``q_x`` symmetric in ``[-(2**(a-1)-1), 2**(a-1)-1]``, fed to the
   wordlines as ``u_x = q_x + o_x`` with ``o_x = 2**(a-1)``, corrected digitally.  Conv zero padding
   is ``q_x = 0`` (im2col: :mod:`.geometry`).
2. **Bit-serial inputs**, ``d = spec.dac_bits`` per cycle, ``J = ceil(a/d)`` cycles, least
   significant first: ``u_x = sum_j 2**(j d) x_j``.
3. **Weights** as stored on the crossbars, read per row strip of tiles (:mod:`.strips`).
4. **Crossbar read** = integer dot product ``v = x_j . g`` over the tile's rows (``g`` = cell level,
   or its perturbed conductance with non-idealities, :mod:`.devices`), then the **ADC** (:mod:`.adc`).
5. **Digital**: shift-and-add over input cycles and slices, minus the ``-`` polarity, the offset
   corrections, times ``tile scale x s_x``, summed over the row strips; plus bias.

With a lossless ADC and no non-idealities steps 2-5 give exactly the integers ``q_x . q_w``, which
the fast path computes with one matmul per row strip (:mod:`.arrays`); the two paths' float outputs
are bit-identical (:mod:`.layer`).

Modules, imports one way (each imports only those above it):

* ``options``     -- :class:`SimOptions`, :class:`SimError`
* ``activations`` -- :func:`quantize_activations`
* ``geometry``    -- input/bias checks, conv padding, im2col windows, output layout, fast-path chunks
* ``adc``         -- the ADC model (lossless check, step, codes, offset)
* ``strips``      -- tile program checks and the row strips of tiles read from the cells
* ``devices``     -- stuck-at faults and conductance variation, seeded per crossbar
* ``arrays``      -- the exact fast path and the bit-serial path (shift-and-add)
* ``layer``       -- :class:`CompiledLayer`, composing the above
* ``api``         -- the cache and the public functions
"""

from __future__ import annotations

import sys
import types
from typing import Any

from . import geometry as _geometry
from .activations import quantize_activations
from .api import clear_cache, compile_layer, golden_layer, layer_integers, layer_program, run_layer
from .geometry import _EXACT_CHUNK_BYTES, _EXACT_CHUNK_MIN  # noqa: F401  (tuning knobs, see below)
from .layer import CompiledLayer
from .options import SimError, SimOptions, _options  # noqa: F401  (_options: used by runtime.verify)

__all__ = [
    "SimOptions", "SimError", "CompiledLayer", "compile_layer", "run_layer", "golden_layer",
    "layer_integers", "layer_program", "quantize_activations", "clear_cache",
]

#: fast-path chunking knobs, read in :mod:`.geometry`; assigning them here sets them there
_GEOMETRY_KNOBS = ("_EXACT_CHUNK_BYTES", "_EXACT_CHUNK_MIN")


class _Package(types.ModuleType):
    """``simulator._EXACT_CHUNK_MIN = 1`` (e.g. a test's monkeypatch) also sets the knob where it is read."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _GEOMETRY_KNOBS:
            setattr(_geometry, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
