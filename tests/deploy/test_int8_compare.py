"""INT8 vs float comparison (build-trt --int8 --verify's check) for real: onnxruntime runs a model
trained on Fashion-MNIST and its QDQ quantization (onnxruntime's quantize_static) on real test images."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from irep_deploy.compare import compare
from irep_deploy.engines import int8 as int8_tools
from irep_deploy.engines import ort as ort_helpers
from irep_deploy.errors import IrepError, VerificationError


@pytest.fixture(scope="module")
def qdq(fmnist_qdq):
    return fmnist_qdq


def _run(path, images):
    return ort_helpers.run(ort_helpers.make_session(str(path)), images)


def test_calibration_images_are_real_normalised_fashion_mnist():
    train = int8_tools.calibration_images("fashion-mnist", (1, 28, 28), 64)
    test = int8_tools.calibration_images("fashion-mnist", (1, 28, 28), 64, split="test")
    assert train.shape == (64, 1, 28, 28) and train.dtype == np.float32
    # eval's normalisation: (x - 0.2860) / 0.3530, so a black pixel is -0.810 and the mean is near 0
    assert abs(float(train.min()) + 0.2860 / 0.3530) < 1e-5 and abs(float(train.mean())) < 0.3
    assert not np.array_equal(train, test)  # calibration and verification images differ
    three = int8_tools.calibration_images("fashion-mnist", (3, 28, 28), 8)
    assert three.shape == (8, 3, 28, 28) and np.array_equal(three[:, 0], three[:, 2])


@pytest.mark.parametrize("dataset, chw, msg", [("fashion-mnist", (1, 32, 32), "wrong shape"),
                                               ("cifar10", (1, 32, 32), "network takes 1 input channel")])
def test_calibration_images_wrong_shape_or_channels(dataset, chw, msg):
    with pytest.raises(IrepError, match=msg) as info:
        int8_tools.calibration_images(dataset, chw, 8, data_root="/nonexistent", source="m.onnx")
    assert str(info.value).startswith("m.onnx:") and "\n" not in str(info.value)


def test_too_few_images():
    with pytest.raises(IrepError, match="has only 10000 test images, --calib-size asks for 10001"):
        int8_tools.calibration_images("fashion-mnist", (1, 28, 28), 10001, split="test", source="m.onnx")


def test_qdq_graph_is_recognised(fmnist, qdq):
    assert not int8_tools.is_quantized(onnx.load(str(fmnist["onnx"])))
    model = onnx.load(str(qdq))
    assert int8_tools.is_quantized(model)
    zero_points = [i for i in model.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
    with pytest.raises(IrepError, match="already quantized"):
        int8_tools.quantize_qdq(qdq.read_bytes(), np.zeros((4, 1, 28, 28), np.float32), source=str(qdq))


def test_int8_agrees_with_fp32_on_real_images(fmnist, qdq):
    images = int8_tools.calibration_images("fashion-mnist", (1, 28, 28), 512, split="test")
    ref, got = _run(fmnist["onnx"], images), _run(qdq, images)
    check = int8_tools.check_int8(ref, got)
    assert check.examples == 512 and check.cosine > 0.99 and check.top1_agreement >= 0.95
    assert 0 < check.max_abs_error  # it is really quantized, not the float graph again


def test_int8_check_fails_for_another_model(fmnist, ckpts, qdq):
    """A wrong engine (here: the reference's logits shuffled between images) fails both limits."""
    images = int8_tools.calibration_images("fashion-mnist", (1, 28, 28), 256, split="test")
    ref = _run(fmnist["onnx"], images)
    wrong = ref[np.random.default_rng(0).permutation(len(ref))]
    assert compare(ref, wrong).top1_agreement < 0.5
    with pytest.raises(VerificationError) as info:
        int8_tools.check_int8(ref, wrong)
    assert "top-1 agreement" in str(info.value) and "nothing written" in str(info.value)
    assert "\n" not in str(info.value)


class _Int8EngineStandIn:
    """NOT TensorRT: answers like an INT8 engine with onnxruntime running ``path`` (a QDQ graph runs
    quantized there); TrtRunner itself needs TensorRT and a GPU (tests/deploy/test_trt_gpu.py)."""

    def __init__(self, path, shuffle: bool = False) -> None:
        import torch
        self.session, self.shuffle, self.torch = ort_helpers.make_session(str(path)), shuffle, torch

    def batch_range(self):
        return 1, 64

    def __call__(self, x):
        out = ort_helpers.run(self.session, x.numpy())
        return self.torch.from_numpy(out[::-1].copy() if self.shuffle else out)  # reversed: other images' logits


def test_build_trt_int8_verify_on_real_images(fmnist, qdq):
    from irep_deploy.engines.tensorrt import verify_int8
    images = int8_tools.calibration_images("fashion-mnist", (1, 28, 28), 256, split="test")
    stats = verify_int8(_Int8EngineStandIn(qdq), fmnist["onnx"], images)
    assert stats["examples"] == 256 and stats["cosine"] > 0.99 and stats["top1_agreement"] >= 0.95
    with pytest.raises(VerificationError, match="INT8 engine output differs from onnxruntime on 256 real images"):
        verify_int8(_Int8EngineStandIn(qdq, shuffle=True), fmnist["onnx"], images)
