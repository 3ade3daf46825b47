"""A torchvision architecture trained and exported the way a user would, on an image folder.

The model is ``torchvision.models.mobilenet_v3_small(num_classes=10)``: depthwise convolutions,
squeeze-and-excitation blocks (a channel-wise Mul by a pooled branch), hardswish and residual
adds, the building blocks of the detectors and classifiers users bring. It is trained with plain
torch (``torchvision.datasets.ImageFolder``, SGD with momentum, a few epochs, BatchNorm statistics
recomputed at the end) on a Fashion-MNIST
class folder written by ``benchmarks/fmnist_folder.py``, images resized to 32x32 and normalised
with the ImageNet mean and std, then exported in eval mode with the legacy ``torch.onnx.export``
(dynamic batch axis, opset 17), which folds every BatchNorm into its convolution: the exported
file has no BatchNormalization node (checked here). Why MobileNetV3-Small and not ResNet-18:
ResNet-18 has 11.2 M parameters (45 MB as float32), over the 10 MB limit for a committed ONNX
file, and costs ~20x the CPU time per image; MobileNetV3-Small with 10 classes has 1.5 M
parameters (~6 MB).

    python benchmarks/fmnist_folder.py --out /tmp/fmnist-train --limit 500
    python benchmarks/fmnist_folder.py --out /tmp/fmnist-val --split test --limit 100
    python benchmarks/torchvision_fmnist.py --train /tmp/fmnist-train --val /tmp/fmnist-val

Writes ``benchmarks/results/torchvision_fmnist/mobilenet_v3_small.onnx`` and
``benchmarks/results/torchvision_fmnist.json`` (training settings, per-epoch loss, folder
accuracy of the torch model and of the exported file under onnxruntime, the check that the
export is BN-free).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 32


_OPS_STANDIN = []  # keeps the stand-in op library alive (a Library removes its ops when collected)


def import_torchvision():
    """``torchvision``, also with the CPU torch wheel beside PyPI's (CUDA-built) torchvision wheel.

    Its C++ ops (``_C.so``) then fail to load (``libc10_cuda.so`` is missing), which torchvision
    tolerates, but ``torchvision/_meta_registrations.py`` registers fake kernels for
    ``torchvision::nms`` and ``::qnms`` unguarded and stops ``import torchvision`` with
    "operator torchvision::nms does not exist" (pytorch/vision#9085). Declaring the two schemas
    first lets the import through; the models, transforms and ImageFolder, all this project needs,
    are pure Python. Detection ops (``torchvision.ops.nms``) stay unavailable, as with a warning.
    """
    import importlib.util
    import sys

    if "torchvision" not in sys.modules:
        import ctypes

        import torch

        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            raise ImportError("torchvision is not installed (bash scripts/setup.sh installs it)")
        try:
            ctypes.CDLL(str(Path(spec.origin).parent / "_C.so"))
        except OSError:
            lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _OPS_STANDIN.append(lib)
    import torchvision

    return torchvision


def transform(size: int = SIZE):
    import_torchvision()
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(MEAN, STD)])


def build(seed: int = 0):
    import torch

    torchvision = import_torchvision()
    torch.manual_seed(seed)
    return torchvision.models.mobilenet_v3_small(num_classes=10)


def export(model, path: str | Path, size: int = SIZE) -> Path:
    """Eval-mode legacy export with a dynamic batch axis, as users' exports are (BatchNorm folded)."""
    import torch

    model.eval()
    path = Path(path)
    with torch.no_grad():
        torch.onnx.export(model, torch.zeros(1, 3, size, size), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def batchnorm_nodes(path: str | Path) -> int:
    import onnx

    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def train(model, folder: str | Path, *, epochs: int, batch_size: int, lr: float, seed: int, threads: int) -> list[float]:
    import torch

    datasets = import_torchvision().datasets

    torch.set_num_threads(threads)
    data = datasets.ImageFolder(str(folder), transform=transform())
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    losses = []
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        losses.append(total / count)
        print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
    recalibrate_batchnorm(model, loader)
    return losses


def recalibrate_batchnorm(model, loader, batches: int = 50) -> None:
    """BatchNorm running statistics recomputed as plain averages over ``batches`` training batches
    with the final weights. torchvision's MobileNetV3 keeps them with momentum 0.01, an average
    over the last ~100 steps of weights that were still changing: after a few epochs the eval-mode
    model collapses to one constant output (measured: 10% accuracy, train-mode 34%)."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for k, (x, _) in enumerate(loader):
            if k == batches:
                break
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def torch_accuracy(model, folder: str | Path) -> float:
    import torch

    datasets = import_torchvision().datasets

    data = datasets.ImageFolder(str(folder), transform=transform())
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(data, batch_size=256):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(data)


def onnx_accuracy(path: str | Path, folder: str | Path) -> float:
    """Accuracy of the ONNX file under onnxruntime on the folder, read by onnxdns's source."""
    import onnxruntime as ort

    from onnxdns.sources import model_inputs, open_source

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    source = open_source(str(folder), model_inputs(str(path)), mean=MEAN, std=STD)
    correct = 0
    for batch in source.batches(256):
        logits = sess.run(None, dict(batch.inputs))[0]
        correct += int((logits.argmax(1) == batch.labels).sum())
    return correct / len(source)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, required=True, metavar="DIR", help="class folder to train on")
    p.add_argument("--val", type=Path, required=True, metavar="DIR", help="class folder to measure accuracy on")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=RESULTS / "torchvision_fmnist")
    args = p.parse_args(argv)
    import torch

    torchvision = import_torchvision()
    start = time.time()
    model = build(args.seed)
    losses = train(model, args.train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   threads=args.threads)
    train_seconds = time.time() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = export(model, args.out_dir / "mobilenet_v3_small.onnx")
    bn = batchnorm_nodes(path)
    if bn:
        print(f"torchvision_fmnist.py: error: the export kept {bn} BatchNormalization nodes", file=sys.stderr)
        return 1
    report = {
        "benchmark": "torchvision_fmnist",
        "command": "python benchmarks/torchvision_fmnist.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "torchvision.models.mobilenet_v3_small(num_classes=10)",
        "input": [None, 3, SIZE, SIZE],
        "mean": MEAN,
        "std": STD,
        "train_images": len(torchvision.datasets.ImageFolder(str(args.train))),
        "val_images": len(torchvision.datasets.ImageFolder(str(args.val))),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "epoch_loss": [round(x, 4) for x in losses],
        "train_seconds": round(train_seconds, 1),
        "val_accuracy_torch": torch_accuracy(model, args.val),
        "val_accuracy_onnx": onnx_accuracy(path, args.val),
        "batchnorm_nodes": bn,
        "file_bytes": path.stat().st_size,
        "file": str(path.resolve().relative_to(RESULTS.parent.parent)) if path.resolve().is_relative_to(RESULTS.parent.parent) else str(path),
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "torchvision": torchvision.__version__},
    }
    (RESULTS / "torchvision_fmnist.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("val_accuracy_torch", "val_accuracy_onnx", "file_bytes", "train_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
