"""Hostile data sets and resource requests (issue 21, items 7 and 8).

Data: a copy of the shared tiny Fashion-MNIST root (or a small image folder) with one file broken,
through every command that reads a data set (train, search, eval of a checkpoint and of an ONNX,
quantize calibration, bench --int8, demo). Resources: batches, bench inputs and header input sizes
whose memory is refused up front; --input-size/--batch that a fixed-shape ONNX cannot take.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

AREA = "data"
TINY = "--epochs 1 --limit 64 --width 0.125 --batch-size 32"
TRAIN = "train -o {case}/run --dataset fashion-mnist --data-root {case}/fm --backbone resnet18_cifar " + TINY
SEARCH = ("search -o {case}/s --dataset fashion-mnist --data-root {case}/fm --backbone resnet18_cifar --limit 64 "
          "--width 0.125 --batch-size 32 --rounds 1 --warmup-epochs 1 --population 4 --val-fraction 0.25")
EVAL_CKPT = "eval {deploy} --dataset fashion-mnist --data-root {case}/fm"
EVAL_ONNX = "eval {onnx28} --dataset fashion-mnist --data-root {case}/fm"
QUANT = "quantize {onnx28} --calib fashion-mnist --data-root {case}/fm --calib-size 32 -o {out_onnx}"
TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"


# -- Fashion-MNIST roots with one file broken ---------------------------------------------------------
def _idx(values: bytes, dims: Tuple[int, ...], magic: int = 8) -> bytes:
    return bytes([0, 0, magic, len(dims)]) + b"".join(int(n).to_bytes(4, "big") for n in dims) + values


def _gz(path: Path, raw: bytes) -> None:
    with gzip.open(str(path), "wb") as handle:
        handle.write(raw)


def _deflate_broken(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    for i in range(20, len(raw) - 8):  # the deflate stream, not the gzip header or trailer
        raw[i] ^= 0x5A
    p.write_bytes(bytes(raw))


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-20])


def _labels_250(p: Path) -> None:
    _gz(p, _idx(bytes([250]) * 40, (40,)))


def _zero_images(p: Path) -> None:
    _gz(p, _idx(b"", (0, 28, 28)))


def _count_39(p: Path) -> None:
    _gz(p, _idx(bytes(39), (39,)))


def _wrong_magic(p: Path) -> None:
    _gz(p, _idx(bytes(40 * 28 * 28), (40, 28, 28), magic=0x0D))


def _header_too_big(p: Path) -> None:  # claims 2^32 images of 28 x 28, holds 40
    _gz(p, _idx(bytes(40 * 28 * 28), (0xFFFFFFFF, 28, 28)))


def _empty_file(p: Path) -> None:
    p.write_bytes(b"")


def _fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(str(p))


def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


def fm(name: str, breaker: Callable[[Path], None], needs: Tuple[str, ...] = ()):
    """Setup: {case}/fm, the shared tiny Fashion-MNIST with ``name`` broken by ``breaker``; {bad} names it."""
    def setup(case: Path, f: Dict[str, Path]):
        for module in needs:
            if importlib.util.find_spec(module) is None:
                raise _hostile_skip("needs {} (not installed in this lane)".format(module))
        root = case / "fm"
        shutil.copytree(str(f["tiny_fmnist"]), str(root))
        breaker(root / name)
        return {"bad": root / name}, None
    return setup


# -- image folders --------------------------------------------------------------------------------------
def _png(path: Path, size: Tuple[int, int] = (12, 10)) -> None:
    from PIL import Image
    Image.new("RGB", size, (200, 30, 30)).save(str(path))


def _bomb_png(path: Path, side: int) -> None:
    """A side x side 1-bit PNG written chunk by chunk: a few KB of zlib for hundreds of megapixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _rgb_checkpoint(path: Path) -> None:
    from irep_deploy import build_model, fuse_model, save_checkpoint
    # 224 px: the image-folder transforms crop to 224, and eval refuses data of another size
    net = build_model("resnet18_cifar", width=0.125, num_classes=10, in_channels=3, input_size=224).eval()
    save_checkpoint(path, fuse_model(net))


def images(breaker: Optional[Callable[[Path], Optional[Path]]], part: str = "val", n: int = 2):
    """Setup: {case}/if, a two-class image folder (train/ and val/) with one file of ``part`` broken by
    ``breaker`` (given the class folder, returns the file it broke: {bad}); {rgb}: a 3-channel deploy
    checkpoint that can evaluate it."""
    def setup(case: Path, f: Dict[str, Path]):
        root = case / "if"
        for p in ("train", "val"):
            for cls in ("a", "b"):
                (root / p / cls).mkdir(parents=True)
                for i in range(n):
                    _png(root / p / cls / "{}.png".format(i))
        extra = {"rgb": case / "rgb.pt"}
        _rgb_checkpoint(extra["rgb"])
        bad = breaker(root / part / "a") if breaker is not None else None
        if bad is not None:
            extra["bad"] = bad
        return extra, None
    return setup


def _corrupt_png(folder: Path) -> Path:
    p = folder / "1.png"
    p.write_bytes(p.read_bytes()[:40] + b"\x00" * 40)
    return p


def _truncated_jpeg(folder: Path) -> Path:
    from PIL import Image
    p = folder / "2.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(str(p), quality=90)
    p.write_bytes(p.read_bytes()[:200])
    return p


def _text_as_png(folder: Path) -> Path:
    p = folder / "1.png"
    p.write_text("not an image, only named like one\n")
    return p


def _bomb(side: int) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        p = folder / "1.png"
        _bomb_png(p, side)
        return p
    return make


def _fifo_png(folder: Path) -> Path:
    p = folder / "1.png"
    _fifo(p)
    return p


def _empty_class(folder: Path) -> Path:
    empty = folder.parent / "empty"
    empty.mkdir()
    return empty


def _no_classes(folder: Path) -> Path:
    val = folder.parent
    shutil.rmtree(str(val))
    val.mkdir()
    return val


class _ImportsEvil:
    """Pickles to "import evilmod" (what a hostile CIFAR-10 batch would carry)."""

    def __reduce__(self):
        import importlib
        return importlib.import_module, ("evilmod",)


def cifar(kind: str):
    """Setup: {case}/cifar/cifar-10-batches-py holding the six batch files and the meta file, one of
    them (data_batch_1: {bad}) a pickle that imports evilmod ("pickle") or a FIFO ("fifo")."""
    def setup(case: Path, f: Dict[str, Path]):
        import pickle
        d = case / "cifar" / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for name in ["data_batch_{}".format(i) for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            (d / name).write_bytes(pickle.dumps({"data": b"", "labels": []}))
        _rgb_checkpoint(case / "rgb.pt")
        bad = d / "data_batch_1"
        if kind == "fifo":
            _fifo(bad)
        else:
            bad.write_bytes(pickle.dumps({"data": _ImportsEvil(), "labels": []}))
        return {"bad": bad, "rgb": case / "rgb.pt"}, None
    return setup


def rgb_onnx(case: Path, f: Dict[str, Path]):
    """{case}/if with a corrupt PNG in train/ (as :func:`images`) and {rgb_onnx}: a 3-channel 224 x 224 ONNX."""
    import contextlib
    import io
    from irep_deploy.cli import main
    extra, _ = images(_corrupt_png, part="train", n=16)(case, f)  # quantize calibrates on at least 32
    extra["rgb_onnx"] = case / "rgb.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        if main(["export", str(extra["rgb"]), "-o", str(extra["rgb_onnx"]), "--simplify", "none",
                 "--input-size", "224"]) != 0:
            raise _hostile_skip("could not export the 3-channel ONNX here")
    return extra, None


# -- resources ------------------------------------------------------------------------------------------
def big_header(case: Path, f: Dict[str, Path]):
    """{big}: a multi-branch checkpoint of the 8x8 digits-size network whose header says input_size 4096
    (written by the library itself: the model is built for 4096), and {bigd}, its fused deploy file."""
    from irep_deploy import ArchCode, build_model, fuse_model, save_checkpoint
    code = ArchCode.load(f["arch"])
    net = build_model("resnet18_cifar", arch=code, width=0.125, num_classes=10, in_channels=1,
                      input_size=4096).eval()
    big, bigd = case / "big.pt", case / "bigd.pt"
    save_checkpoint(big, net, extra={"dataset": "digits"})
    save_checkpoint(bigd, fuse_model(net, check=False), extra={"dataset": "digits"})  # no 4096 px check batch
    return {"big": big, "bigd": bigd}, None


def fixed_batch_onnx(case: Path, f: Dict[str, Path]):
    """{fixed}: the shared ONNX with its batch axis fixed at 2."""
    import onnx
    model = onnx.load(str(f["onnx"]))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 2
    onnx.save(model, str(case / "fixed.onnx"))
    return {"fixed": case / "fixed.onnx"}, None


_SKIP = [Exception]  # hostile.Skip, set by cases()


def _hostile_skip(reason: str) -> Exception:
    return _SKIP[0](reason)


def cases(H):
    _SKIP[0] = H.Skip
    C = H.H
    fmc, img, res, shp = "corrupt Fashion-MNIST", "corrupt image folder", "resource request", "fixed-shape input"
    EV = "eval {rgb} --dataset imagefolder --data-root {case}/if --batch-size 8"
    return [
        # Fashion-MNIST through train
        C(AREA, fmc, TRAIN, 1, "{bad}", setup=fm(TRAIN_IMAGES, _deflate_broken), label="train: broken deflate"),
        C(AREA, fmc, TRAIN, 1, "{bad}", setup=fm(TRAIN_LABELS, _truncated), label="train: truncated gz"),
        C(AREA, fmc, TRAIN, 1, "{bad}", setup=fm(TRAIN_LABELS, _labels_250), label="train: labels 250"),
        C(AREA, fmc, TRAIN, 1, "{bad}", setup=fm(TRAIN_IMAGES, _zero_images), label="train: zero images"),
        C(AREA, fmc, TRAIN, 1, "{bad}", setup=fm(TRAIN_LABELS, _count_39), label="train: 40 images, 39 labels"),
        C(AREA, fmc, TRAIN, 1, "{bad}", setup=fm(TRAIN_IMAGES, _fifo), label="train: FIFO as the images"),
        C(AREA, fmc, TRAIN, 1, "{bad}", setup=fm(TRAIN_LABELS, _directory), label="train: directory as the labels"),
        C(AREA, fmc, TRAIN.replace("{case}/fm", "{afile}"), 1, "{afile}", label="train: data root is a file"),
        C(AREA, fmc, TRAIN, 1, "{bad}", setup=fm(TRAIN_IMAGES, _header_too_big), label="train: header 2^32 images"),
        # ... through search
        C(AREA, fmc, SEARCH, 1, "{bad}", setup=fm(TRAIN_IMAGES, _deflate_broken), label="search: broken deflate"),
        C(AREA, fmc, SEARCH, 1, "{bad}", setup=fm(TRAIN_LABELS, _labels_250), label="search: labels 250"),
        C(AREA, fmc, SEARCH, 1, "{bad}", setup=fm(TRAIN_IMAGES, _zero_images), label="search: zero images"),
        C(AREA, fmc, SEARCH, 1, "{bad}", setup=fm(TRAIN_IMAGES, _wrong_magic), label="search: wrong IDX magic"),
        # ... through eval of a checkpoint and of an ONNX file
        C(AREA, fmc, EVAL_CKPT, 1, "{bad}", setup=fm(TEST_IMAGES, _truncated), label="eval ckpt: truncated test gz"),
        C(AREA, fmc, EVAL_CKPT, 1, "{bad}", setup=fm(TEST_LABELS, _labels_250), label="eval ckpt: test labels 250"),
        C(AREA, fmc, EVAL_CKPT, 1, "{bad}", setup=fm(TEST_LABELS, _count_39), label="eval ckpt: count mismatch"),
        C(AREA, fmc, EVAL_CKPT + " --split train", 1, "{bad}", setup=fm(TRAIN_IMAGES, _empty_file),
          label="eval ckpt: empty gz file"),
        C(AREA, fmc, EVAL_ONNX, 1, "{bad}", setup=fm(TEST_IMAGES, _deflate_broken), label="eval onnx: broken deflate"),
        C(AREA, fmc, EVAL_ONNX, 1, "{bad}", setup=fm(TEST_LABELS, _fifo), label="eval onnx: FIFO as the labels"),
        # ... through quantize's and bench --int8's calibration, and the demo
        C(AREA, fmc, QUANT, 1, "{bad}", setup=fm(TRAIN_IMAGES, _deflate_broken), label="quantize: broken deflate"),
        C(AREA, fmc, QUANT, 1, "{bad}", setup=fm(TRAIN_LABELS, _labels_250), label="quantize: labels 250"),
        C(AREA, fmc, QUANT, 1, "{bad}", setup=fm(TRAIN_IMAGES, _header_too_big), label="quantize: header 2^32"),
        C(AREA, fmc, QUANT, 1, "{bad}", setup=fm(TRAIN_IMAGES, _directory), label="quantize: directory as images"),
        C(AREA, fmc, "bench {deploy} --int8 --calib fashion-mnist --data-root {case}/fm --calib-size 32 --input-size 28 "
          "--duration 0.01 --iterations 1", 1, "{bad}", setup=fm(TRAIN_IMAGES, _truncated, needs=("onnxruntime",)),
          label="bench --int8: truncated gz"),
        C(AREA, fmc, "demo -o {case}/demo --data-root {case}/fm --quiet", 1, "{bad}",
          setup=fm(TRAIN_LABELS, _labels_250, needs=("tensorboard",)), label="demo: labels 250"),
        # image folders (decoded lazily: the error comes from the batch that needs the file)
        C(AREA, img, EV, 1, "{bad}", setup=images(_corrupt_png), label="eval imagefolder: corrupt PNG"),
        C(AREA, img, EV + " --workers 1", 1, "{bad}", setup=images(_corrupt_png),
          label="eval imagefolder: corrupt PNG in a loader worker"),
        C(AREA, img, EV, 1, "{bad}", setup=images(_truncated_jpeg), label="eval imagefolder: truncated JPEG"),
        C(AREA, img, EV, 1, "{bad}", setup=images(_text_as_png), label="eval imagefolder: text named .png"),
        C(AREA, img, EV, 1, "{bad}", setup=images(_bomb(20000)), label="eval imagefolder: 20000x20000 PNG bomb"),
        C(AREA, img, EV, 1, "{bad}", setup=images(_bomb(10000)), label="eval imagefolder: 10000x10000 PNG"),
        C(AREA, img, EV, 1, "{bad}", setup=images(_fifo_png), label="eval imagefolder: FIFO named .png"),
        C(AREA, img, EV, 1, "{case}/if/val", setup=images(_empty_class), label="eval imagefolder: empty class"),
        C(AREA, img, EV, 1, "{case}/if/val", setup=images(_no_classes), label="eval imagefolder: no images"),
        C(AREA, img, EV, 0, "", setup=images(None), label="eval imagefolder: valid tree"),
        C(AREA, img, "train -o {case}/run --dataset imagefolder --data-root {case}/if --backbone resnet18_cifar "
          "--epochs 1 --limit 4 --width 0.125 --batch-size 4 --quiet", 1, "{bad}", setup=images(_bomb(20000), part="train"),
          own=("{case}/run",), label="train imagefolder: PNG bomb"),
        C(AREA, img, "quantize {rgb_onnx} --calib imagefolder --data-root {case}/if --calib-size 32 -o {out_onnx}", 1,
          "{bad}", setup=rgb_onnx, label="quantize --calib imagefolder: corrupt PNG"),
        C(AREA, img, "search -o {case}/s --dataset imagefolder --data-root {case}/if --backbone resnet18_cifar "
          "--width 0.125 --batch-size 2 --rounds 1 --warmup-epochs 1 --population 4 --val-fraction 0.5 "
          "--quiet", 1, "{bad}", setup=images(_truncated_jpeg, part="train"), own=("{case}/s",),
          label="search imagefolder: truncated JPEG"),
        # CIFAR-10's batches are pickles: torchvision unpickles them only after their md5 matches the official files
        C(AREA, "corrupt CIFAR-10", "eval {rgb} --dataset cifar10 --data-root {case}/cifar", 1,
          "{case}/cifar/cifar-10-batches-py", setup=cifar("pickle"), label="eval cifar10: a batch that imports a module"),
        C(AREA, "corrupt CIFAR-10", "train -o {case}/run --dataset cifar10 --data-root {case}/cifar --backbone "
          "resnet18_cifar " + TINY, 1, "{case}/cifar/cifar-10-batches-py", setup=cifar("fifo"),
          label="train cifar10: FIFO as a batch"),
        # resources refused up front
        C(AREA, res, "fuse {multi} {arch} -o {out_pt} --batch 4096 --input-size 4096", 2, "--batch 4096 --input-size 4096"),
        C(AREA, res, "fuse {multi} {arch} -o {out_pt} --batch 64 --input-size 1024", 2, "--batch 64 --input-size 1024"),
        C(AREA, res, "bench {deploy} --batch 4096 --input-size 2048 --duration 0.01 --iterations 1", 2,
          "--batch 4096 --input-size 2048"),
        C(AREA, res, "bench {deploy} --batch 1,1024 --input-size 1024 --duration 0.01 --iterations 1", 2,
          "--batch 1024 --input-size 1024"),
        C(AREA, res, "fuse {big} {arch} -o {out_pt}", 1, "{big}", setup=big_header, label="fuse: header input_size 4096"),
        C(AREA, res, "fuse {big} {arch} -o {case}/ok.pt --input-size 8", 0, "", setup=big_header, own=("{case}/ok.pt",),
          label="fuse: header 4096 checked at --input-size 8"),
        C(AREA, res, "bench {bigd} --duration 0.01 --iterations 1", 1, "{bigd}", setup=big_header,
          label="bench: header input_size 4096"),
        C(AREA, res, "export {bigd} -o {out_onnx}", 1, "{bigd}", setup=big_header, label="export: header input_size 4096"),
        C(AREA, res, "export {big} --arch {arch} -o {out_onnx} --input-size 8", 1, "{big}", setup=big_header,
          label="export: multi-branch, header 4096 (fusion check)"),
        C(AREA, res, "export {deploy} -o {out_onnx} --batch 4096 --input-size 2048", 2, "--batch 4096"),
        # a fixed-shape ONNX cannot take another size: refused, not ignored
        C(AREA, shp, "bench {onnx} --input-size 4096 --duration 0.01 --iterations 1", 2, "--input-size 4096"),
        C(AREA, shp, "bench {onnx28} --input-size 32 --duration 0.01 --iterations 1", 2, "--input-size 32"),
        C(AREA, shp, "bench {fixed} --batch 4 --duration 0.01 --iterations 1", 2, "--batch 4", setup=fixed_batch_onnx),
        C(AREA, shp, "bench {onnx} --input-size 32 --duration 0.01 --iterations 1", 0, ""),
    ]
