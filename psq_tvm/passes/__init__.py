"""Relax passes of the pim-psq flow, each a ``tvm.transform.Pass``.

>>> seq = tvm.transform.Sequential([PartitionForPIM(spec), AnnotatePSQ(spec, budget="avg-bits=4.5"), LowerToPIM()])
>>> lowered = seq(mod)            # then tvm.compile(lowered, target="pim-psq")

* :class:`PartitionForPIM` -- BYOC pattern partition (``pim_psq.*`` patterns in TVM's registry);
* :class:`AnnotatePSQ`     -- one whole-model PSQ search, tile decisions attached;
* :class:`LowerToPIM`      -- PIM layers become ``R.call_dps_packed("pim_psq.layer", ...)``.
"""

from .annotate import Annotation, AnnotatePSQ, annotation
from .lower import RUNTIME_FUNC, LowerToPIM
from .partition import LAYER_ATTR, PartitionForPIM, composite_calls, host_layers
from .patterns import PREFIX, active_spec, host_reason

__all__ = ["Annotation", "AnnotatePSQ", "LAYER_ATTR", "LowerToPIM", "PartitionForPIM", "PREFIX", "RUNTIME_FUNC",
           "active_spec", "annotation", "composite_calls", "host_layers", "host_reason"]
