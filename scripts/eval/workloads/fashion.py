"""Fashion-MNIST: the bundled VGG-style CNN on the full Fashion-MNIST test set (10,000 images)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import CACHE, REPO_ROOT, Workload, _classification_metrics, _OnnxAsTorch, _read_idx


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_ONNX = REPO_ROOT / "psq_tvm" / "data" / "fashion_cnn.onnx"


@dataclass
class FashionWorkload(Workload):
    wait_s: float = 3600.0

    def _load(self):
        x = _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        y = _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
        return {"inputs": {self.input_name: x[:, None]}, "labels": y}

    def _bundled(self) -> Path:
        t0 = time.time()
        while not FASHION_ONNX.exists():
            if time.time() - t0 > self.wait_s:
                raise FileNotFoundError(f"{FASHION_ONNX} (run scripts/train_fashion_mnist.py)")
            time.sleep(20)
        return FASHION_ONNX

    def _export(self, path):
        """Copy of the bundled model with the input renamed/fixed to [batch,1,28,28]."""
        import onnx

        m = onnx.load(str(self._bundled()))
        inp = m.graph.input[0]
        old = inp.name
        if old != self.input_name:
            inp.name = self.input_name
            for node in m.graph.node:
                for i, n in enumerate(node.input):
                    if n == old:
                        node.input[i] = self.input_name
        dims = inp.type.tensor_type.shape.dim
        for d, v in zip(dims, (self.batch_size, 1, 28, 28)):
            d.Clear()
            d.dim_value = v
        onnx.checker.check_model(m)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save(m, str(tmp))
        os.replace(tmp, path)

    def onnx_path(self) -> Path:
        path = CACHE / f"{self.name}.onnx"
        # re-derive when the bundled model is retrained
        if path.exists() and FASHION_ONNX.exists() and FASHION_ONNX.stat().st_mtime > path.stat().st_mtime:
            path.unlink()
            self._ref_path().unlink(missing_ok=True)
        return super().onnx_path()

    def torch_model(self):
        """No PyTorch source module is committed: the bundled ONNX graph executed op by op with torch."""
        import onnx

        return _OnnxAsTorch(onnx.load(str(self._bundled())))

    def _metrics(self, out, labels, ref):
        return _classification_metrics(out, labels, ref)


WORKLOADS = {
    "fashion": FashionWorkload(
        name="fashion", batch_size=500, primary_metric="top1",
        description="bundled VGG-style CNN (6 conv + 2 FC, BN folded) on the full Fashion-MNIST test set",
        source="psq_tvm/data/fashion_cnn.onnx (scripts/train_fashion_mnist.py); "
               "Debian dataset-fashion-mnist t10k-*.gz"),
}
