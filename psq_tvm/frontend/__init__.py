"""ONNX frontend: load and check a model, fold computed shapes, import to Relax, BatchNorm statistics."""

from .bn_stats import batchnorm_input_stats
from .onnx_import import ModelImportError, import_onnx, parse_input_shapes, prepare_onnx

__all__ = ["ModelImportError", "batchnorm_input_stats", "import_onnx", "parse_input_shapes", "prepare_onnx"]
