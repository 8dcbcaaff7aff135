"""Ultralytics YOLO (optional, AGPL-3.0): YOLOv8n and YOLO11n built from their yaml (never downloaded
weights) get IrepConv blocks, and Ultralytics' own fuse(), trainer, predict, val and export work on
them. Everything runs offline (the ``offline`` fixture of this folder's conftest fails a test that
tries the network)."""
from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("ultralytics")
from ultralytics import YOLO  # noqa: E402

from irep_deploy import IrepError, current_arch  # noqa: E402
from irep_deploy.block import IrepConv  # noqa: E402
from irep_deploy.integrations.ultralytics import (IrepDetectionModel, IrepDetectionTrainer,  # noqa: E402
                                                  fuse_yolo, irepify_yolo)

from conftest import randomize_arch_params, randomize_bn, rel_err  # noqa: E402
from .yolo_data import write_yolo_set  # noqa: E402

IMGSZ = 64


def head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The detector's raw output in eval mode: boxes and class scores per anchor (before NMS)."""
    with torch.no_grad():
        return model.eval()(x)[0]


def blocks(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, IrepConv)]


@pytest.mark.parametrize("yaml, rewritten", [("yolov8n.yaml", 39), ("yolo11n.yaml", 42)])
def test_irepify_and_ultralytics_fuse_are_exact_on_multi_branch_and_fused_models(yaml, rewritten, tmp_path,
                                                                                monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    yolo = YOLO(yaml)
    original = copy.deepcopy(yolo.model)
    irepify_yolo(yolo, seed=0)
    model = yolo.model
    assert type(model) is IrepDetectionModel and len(blocks(model)) == rewritten
    assert all(b.active for b in blocks(model)), "a random code of 2/3 of the slots leaves no block empty"
    xs = [torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)),
          torch.rand(1, 3, 128, 64, generator=torch.Generator().manual_seed(1))]
    for x in xs:  # new branches start at zero output: exactly the original detector
        assert torch.equal(head(original, x), head(model, x))
    randomize_arch_params(randomize_bn(model))  # as after training: every branch and BN matters
    multi = [head(model, x) for x in xs]

    # Ultralytics' own fuse() (what predict/val/export call) fuses the blocks and every BN
    ultra = copy.deepcopy(model).fuse(verbose=False)
    assert ultra.irep_config["deploy"] and ultra.is_fused()
    assert not blocks(ultra) and not any(isinstance(m, nn.BatchNorm2d) for m in ultra.modules())
    for x, ref in zip(xs, multi):
        assert rel_err(head(ultra, x), ref) < 1e-5

    fuse_yolo(yolo)  # our entry point, then Ultralytics' fuse() again on the fused model: a no-op
    fused = [head(yolo.model, x) for x in xs]
    yolo.model.fuse(verbose=False)
    for x, ref, once in zip(xs, multi, fused):
        assert rel_err(once, ref) < 1e-5
        assert torch.equal(head(yolo.model, x), once)
    with pytest.raises(IrepError, match="already fused"):
        fuse_yolo(yolo)


def onnx_ops(path: Path) -> Counter:
    import onnx
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.slow
def test_yolov8n_trains_with_ultralytics_then_predicts_validates_and_exports_fused(tmp_path, monkeypatch, offline):
    """The user's loop: irepify, train with Ultralytics' trainer, then Ultralytics' predict, val and
    export(format="onnx") of the fused model; onnxruntime computes what the multi-branch model does."""
    monkeypatch.chdir(tmp_path)  # a yaml-built model exports next to the working directory
    ort = pytest.importorskip("onnxruntime")
    data = write_yolo_set(tmp_path / "data", train=16, val=8, size=IMGSZ)
    settings = dict(data=str(data), imgsz=IMGSZ, batch=8, workers=0, device="cpu", amp=False, plots=False,
                    project=str(tmp_path / "runs"), exist_ok=True, seed=0, verbose=False)
    yolo = irepify_yolo(YOLO("yolov8n.yaml"), nc=10, seed=0)
    code = current_arch(yolo.model)
    start = copy.deepcopy(yolo.model)

    with pytest.raises(IrepError, match="trainer=IrepDetectionTrainer"):  # the default trainer is refused
        yolo.train(**settings, name="default", epochs=1)
    seen = {}
    yolo.add_callback("on_train_end", lambda trainer: seen.update(ema=trainer.ema.ema, model=trainer.model))
    yolo.train(**settings, name="irep", epochs=2, warmup_epochs=0, trainer=IrepDetectionTrainer)

    # the trained model, its EMA copy and best.pt (Ultralytics' pickle, reloaded by train()) keep the blocks
    best = Path(yolo.trainer.best)
    for model in (seen["model"], seen["ema"], yolo.model, YOLO(str(best)).model):
        assert type(model) is IrepDetectionModel and current_arch(model) == code
    trained = dict(yolo.model.named_parameters())
    moved = [n for n, p in start.named_parameters() if ".branches." in n and not torch.equal(p, trained[n])]
    assert len(moved) > 100, "training updated the branches"
    multi = copy.deepcopy(yolo.model).eval()

    # predict on the multi-branch model: Ultralytics' fuse() fuses the blocks of the model it runs
    results = yolo.predict(str(data.parent / "images" / "val"), imgsz=IMGSZ, device="cpu", verbose=False)
    assert len(results) == 8
    ran = yolo.predictor.model.model
    assert ran.irep_config.get("deploy") and not blocks(ran)

    # val and export of the fused model, through Ultralytics' own entry points
    fused = fuse_yolo(YOLO(str(best)))
    metrics = fused.val(data=str(data), imgsz=IMGSZ, batch=8, workers=0, device="cpu", plots=False, verbose=False)
    assert 0.0 <= metrics.box.map50 <= 1.0
    onnx_file = Path(fused.export(format="onnx", imgsz=IMGSZ, device="cpu"))
    ops = onnx_ops(onnx_file)
    assert "BatchNormalization" not in ops
    # the same detector without blocks (80 classes: the class count changes shapes, not ops)
    plain_file = Path(YOLO("yolov8n.yaml").export(format="onnx", imgsz=IMGSZ, device="cpu"))
    assert ops == onnx_ops(plain_file), "a branch op or a BN survived into the ONNX"

    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    error = rel_err(torch.from_numpy(np.asarray(out)), head(multi, x))
    print("onnxruntime vs multi-branch torch: relative error {:.2e}, ONNX ops {}".format(error, dict(ops)))
    assert error < 1e-4


def test_a_file_pil_cannot_read_is_one_line_also_where_ultralytics_patched_pil(tmp_path):
    """Importing Ultralytics replaces PIL.Image.open process-wide with a version that imports a HEIF
    plugin (pi_heif) when PIL cannot identify a file; without the plugin that was an ImportError
    traceback from our image-folder loader. It stays the loader's one-line error."""
    from PIL import Image

    from irep_deploy.data import ImageFileError, load_image
    if not Image.open.__module__.startswith("ultralytics"):
        pytest.skip("this Ultralytics does not patch PIL.Image.open")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"plain text, not an image\n")
    with pytest.raises(ImageFileError, match=r"bad\.png.*: not a readable image \(cannot identify image file"):
        load_image(str(bad))
