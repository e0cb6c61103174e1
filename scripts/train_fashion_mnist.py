#!/usr/bin/env python3
"""Train a small VGG-style CNN on Fashion-MNIST and export it to ONNX.

What it does
------------
1. Reads the real Fashion-MNIST idx files from the Debian package
   ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*.gz``),
   parsed with numpy only (no torchvision).
2. Trains, deterministically on CPU, a 6-conv VGG-style network::

       Normalize((x - 0.2860) / 0.3530)          # baked into the model
       [Conv3x3(1->32)   BN ReLU] [Conv3x3(32->32)   BN ReLU] MaxPool2   28 -> 14
       [Conv3x3(32->64)  BN ReLU] [Conv3x3(64->64)   BN ReLU] MaxPool2   14 -> 7
       [Conv3x3(64->128) BN ReLU] [Conv3x3(128->128) BN ReLU] MaxPool2    7 -> 3
       Flatten(128*3*3) Linear(1152->128) ReLU Linear(128->10)

   with SGD (Nesterov momentum) + one-cycle learning-rate schedule, label
   smoothing, and a tensor-only augmentation (random horizontal flip and
   random 28x28 crop of the image zero-padded by 2).
3. Measures accuracy on the full 10k Fashion-MNIST test set.
4. Exports the eval-mode model to ONNX (opset 13, TorchScript exporter,
   constant folding on, so BatchNorm is folded into the convolutions by
   the exporter). The ONNX model takes RAW pixels in [0, 1], float32,
   shape [N, 1, 28, 28] (dynamic batch) and returns logits [N, 10].
   The export is checked with ``onnx.checker`` and by running it with
   ``onnx.reference.ReferenceEvaluator`` against the PyTorch outputs.
5. Writes (atomically, temp file + os.replace) into --out-dir:
     fashion_cnn.onnx          the model
     fashion_mnist_test.npz    the first 256 real TEST images
                               (``input``: float32 [256,1,28,28] in [0,1],
                                ``labels``: int64 [256])
     fashion_cnn.json          architecture, weight counts, training
                               settings, measured test accuracy, versions,
                               and the command that produced the files.

How to re-run
-------------
    apt-get install -y dataset-fashion-mnist        # if not installed
    .venv/bin/pip install torch==2.13.0 onnx numpy  # CPU build of torch
    .venv/bin/python scripts/train_fashion_mnist.py   # ~8-10 min on 2 cores

Flags: --epochs (default 3), --seed (default 0), --threads (default 2),
--out-dir (default psq_tvm/data). Results are bit-reproducible for the same
seed, thread count, torch version and CPU.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "psq_tvm" / "data"

MEAN = 0.2860
STD = 0.3530
NUM_SUBSET = 256
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzip-compressed idx file (unsigned-byte data only)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} elements, got {data.size}")
    return data.reshape(dims)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images float32 [N,1,28,28] in [0,1], labels int64 [N])."""
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path = DATA_DIR / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [p for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        sys.exit(
            "error: Fashion-MNIST data not found: "
            + ", ".join(str(p) for p in missing)
            + "\nInstall it with:  apt-get install -y dataset-fashion-mnist"
        )
    images = _read_idx(img_path)
    labels = _read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape} {labels.shape}")
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return np.ascontiguousarray(x), labels.astype(np.int64)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
def build_model():
    import torch
    from torch import nn

    class Normalize(nn.Module):
        """(x - mean) / std, so the model consumes raw [0,1] pixels."""

        def __init__(self, mean: float, std: float):
            super().__init__()
            self.register_buffer("mean", torch.tensor([[[[mean]]]], dtype=torch.float32))
            self.register_buffer("std", torch.tensor([[[[std]]]], dtype=torch.float32))

        def forward(self, x):
            return (x - self.mean) / self.std

    def conv_bn_relu(cin: int, cout: int) -> list:
        return [
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    class FashionVGG(nn.Module):
        def __init__(self, widths=(32, 64, 128), hidden=128, num_classes=10):
            super().__init__()
            self.normalize = Normalize(MEAN, STD)
            layers: list = []
            cin = 1
            for w in widths:
                layers += conv_bn_relu(cin, w) + conv_bn_relu(w, w)
                layers.append(nn.MaxPool2d(2))
                cin = w
            self.features = nn.Sequential(*layers)
            side = 28
            for _ in widths:
                side //= 2  # 28 -> 14 -> 7 -> 3
            self.classifier = nn.Sequential(
                nn.Flatten(),
                nn.Linear(cin * side * side, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            )

        def forward(self, x):
            return self.classifier(self.features(self.normalize(x)))

    return FashionVGG()


def describe_model(model) -> dict:
    from torch import nn

    layers = []
    shape = (1, 28, 28)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            shape = (m.out_channels, shape[1], shape[2])
            layers.append(
                f"Conv2d {m.in_channels}->{m.out_channels} k{m.kernel_size[0]} "
                f"s{m.stride[0]} p{m.padding[0]} -> {list(shape)}"
            )
        elif isinstance(m, nn.BatchNorm2d):
            layers.append(f"BatchNorm2d {m.num_features}")
        elif isinstance(m, nn.ReLU):
            layers.append("ReLU")
        elif isinstance(m, nn.MaxPool2d):
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
            layers.append(f"MaxPool2d 2x2 -> {list(shape)}")
        elif isinstance(m, nn.Flatten):
            layers.append(f"Flatten -> [{shape[0] * shape[1] * shape[2]}]")
        elif isinstance(m, nn.Linear):
            layers.append(f"Linear {m.in_features}->{m.out_features}")
        elif type(m).__name__ == "Normalize":
            layers.append(f"Normalize (x - {MEAN}) / {STD}")
    conv_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    lin_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    lin_b = sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear))
    bn_p = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
               for p in m.parameters())
    return {
        "name": "FashionVGG (6x conv3x3-BN-ReLU, widths 32/64/128, 3 maxpools, 2 Linear)",
        "layers": layers,
        "num_weights": conv_w + lin_w,
        "num_conv_weights": conv_w,
        "num_linear_weights": lin_w,
        "num_linear_biases": lin_b,
        "num_batchnorm_params": bn_p,
        "num_trainable_params": sum(p.numel() for p in model.parameters()),
    }


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
def augment(x, gen):
    """Random horizontal flip + random 28x28 crop of the 2-pixel zero-padded image."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))  # [n,1,32,32]
    oy = torch.randint(0, 5, (n,), generator=gen)
    ox = torch.randint(0, 5, (n,), generator=gen)
    ar = torch.arange(28)
    rows = (oy[:, None] + ar)[:, :, None]  # [n,28,1]
    cols = (ox[:, None] + ar)[:, None, :]  # [n,1,28]
    idx = torch.arange(n)[:, None, None]
    return padded[idx, 0, rows, cols].unsqueeze(1).contiguous()


def evaluate(model, x, y, batch_size: int = 500) -> tuple[float, "np.ndarray"]:
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            preds.append(model(x[i:i + batch_size]).argmax(1))
    pred = torch.cat(preds)
    return int((pred == y).sum()) / len(y), pred.numpy()


def train(model, x_train, y_train, args) -> list[dict]:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(args.seed)
    # channels_last is ~15% faster for these convs on CPU; undone before export.
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                          nesterov=True, weight_decay=args.weight_decay)
    n = len(x_train)
    steps_per_epoch = math.ceil(n / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0)
    history = []
    for epoch in range(args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb = augment(x_train[idx], gen).contiguous(memory_format=torch.channels_last)
            yb = y_train[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            if (step + 1) % 100 == 0:
                print(f"  epoch {epoch + 1} step {step + 1}/{steps_per_epoch} "
                      f"loss {loss_sum / ((step + 1) * args.batch_size):.4f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / n,
               "train_acc_augmented": correct / n, "seconds": time.time() - t0}
        history.append(rec)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {rec['train_loss']:.4f} "
              f"train acc {rec['train_acc_augmented']:.4f} ({rec['seconds']:.0f}s)", flush=True)
    model.to(memory_format=torch.contiguous_format)
    return history


# --------------------------------------------------------------------------
# Export / verification / output
# --------------------------------------------------------------------------
def _atomic_write(path: Path, write_fn) -> None:
    """Call write_fn(tmp_path) then atomically move tmp_path to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_onnx(model, path: Path) -> None:
    import torch

    model.eval()
    dummy = torch.zeros(2, 1, 28, 28, dtype=torch.float32)

    def write(tmp: str) -> None:
        # dynamo=False selects the TorchScript exporter, which warns that it is legacy.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), tmp, dynamo=False, opset_version=13,
            do_constant_folding=True, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )

    _atomic_write(path, write)


def verify_onnx(model, path: Path, x_check: "np.ndarray") -> dict:
    import onnx
    import torch
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = sorted({n.op_type for n in proto.graph.node})
    if "BatchNormalization" in ops:
        print("warning: BatchNormalization was not folded by the exporter", flush=True)
    sess = ReferenceEvaluator(proto)
    (onnx_out,) = sess.run(None, {"input": x_check})
    with torch.no_grad():
        torch_out = model.eval()(torch.from_numpy(x_check)).numpy()
    max_abs = float(np.max(np.abs(onnx_out - torch_out)))
    same_argmax = bool((onnx_out.argmax(1) == torch_out.argmax(1)).all())
    print(f"ONNX check: ops={ops}, {len(x_check)} images, max |onnx - torch| = "
          f"{max_abs:.2e}, same argmax: {same_argmax}", flush=True)
    if not same_argmax or max_abs > 1e-3:
        raise RuntimeError(f"ONNX output mismatch (max abs diff {max_abs})")
    return {"onnx_ops": ops, "opset": proto.opset_import[0].version,
            "verify_images": len(x_check), "verify_max_abs_diff": max_abs}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak one-cycle learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--max-train", type=int, default=0,
                   help="use only the first N training images (0 = all 60000; for smoke tests)")
    p.add_argument("--verify-images", type=int, default=8,
                   help="test images run through the ONNX reference evaluator")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("error: torch missing; install the CPU build with "
                 "`.venv/bin/pip install torch==2.13.0`")

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)

    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    if args.max_train:
        x_train, y_train = x_train[:args.max_train], y_train[:args.max_train]
    print(f"train {x_train.shape}, test {x_test.shape}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}", flush=True)

    model = build_model()
    arch = describe_model(model)
    print(f"model: {arch['num_weights']} weights, "
          f"{arch['num_trainable_params']} trainable params", flush=True)

    t0 = time.time()
    history = train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), args)
    train_seconds = time.time() - t0

    test_acc, test_pred = evaluate(model, torch.from_numpy(x_test), torch.from_numpy(y_test))
    subset_acc = float((test_pred[:NUM_SUBSET] == y_test[:NUM_SUBSET]).mean())
    print(f"test accuracy (10000 images): {test_acc:.4f}; first {NUM_SUBSET}: "
          f"{subset_acc:.4f}; training took {train_seconds:.0f}s", flush=True)

    out_dir = args.out_dir.resolve()
    onnx_path = out_dir / "fashion_cnn.onnx"
    npz_path = out_dir / "fashion_mnist_test.npz"
    json_path = out_dir / "fashion_cnn.json"

    export_onnx(model, onnx_path)
    check = verify_onnx(model, onnx_path, x_test[:args.verify_images])

    x_sub = np.ascontiguousarray(x_test[:NUM_SUBSET], dtype=np.float32)
    y_sub = np.ascontiguousarray(y_test[:NUM_SUBSET], dtype=np.int64)

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, input=x_sub, labels=y_sub)

    _atomic_write(npz_path, write_npz)

    try:
        shown_out = os.path.relpath(out_dir, REPO_ROOT)
    except ValueError:
        shown_out = str(out_dir)
    meta = {
        "description": "VGG-style CNN trained on Fashion-MNIST by scripts/train_fashion_mnist.py",
        "command": "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv]),
        "architecture": arch,
        "input": {"name": "input", "dtype": "float32", "shape": ["batch", 1, 28, 28],
                  "range": [0.0, 1.0],
                  "normalisation": f"baked into the model: (x - {MEAN}) / {STD}"},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 10]},
        "classes": CLASSES,
        "training": {
            "epochs": args.epochs, "seed": args.seed, "threads": args.threads,
            "batch_size": args.batch_size, "optimizer": "SGD nesterov momentum 0.9",
            "lr_schedule": f"OneCycleLR linear, peak {args.lr}",
            "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing,
            "augmentation": "random horizontal flip + random crop 28x28 from 2-pixel zero padding",
            "train_images": len(x_train), "deterministic_algorithms": True,
            "history": history, "wall_time_seconds": round(train_seconds, 1),
        },
        "test_accuracy": test_acc,
        "test_images": len(x_test),
        "subset_test_accuracy": subset_acc,
        "subset_images": NUM_SUBSET,
        "onnx": {"opset": check["opset"], "ops": check["onnx_ops"],
                 "exporter": "torch.onnx.export(dynamo=False, do_constant_folding=True); "
                             "BatchNorm folded into Conv by the exporter",
                 "verified_against_torch": {"images": check["verify_images"],
                                            "max_abs_diff": check["verify_max_abs_diff"]}},
        "files": {
            p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in (onnx_path, npz_path)
        },
        "npz_keys": {"input": f"float32 [{NUM_SUBSET},1,28,28] in [0,1], first "
                              f"{NUM_SUBSET} Fashion-MNIST test images",
                     "labels": f"int64 [{NUM_SUBSET}]"},
        "data_source": str(DATA_DIR) + " (Debian package dataset-fashion-mnist)",
        "out_dir": shown_out,
        "versions": {"torch": torch.__version__, "numpy": np.__version__,
                     "onnx": __import__("onnx").__version__,
                     "python": platform.python_version()},
    }

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")

    _atomic_write(json_path, write_json)
    for p in (onnx_path, npz_path, json_path):
        print(f"wrote {p} ({p.stat().st_size} bytes)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
