"""build-trt --int8 against the stand-in TensorRT modules (trt_standins.py: not TensorRT), the
calibrator on real Fashion-MNIST batches, and the argument errors of the CLI (no TensorRT needed)."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch

from irep_deploy.engines import int8 as int8_tools
from irep_deploy.engines.tensorrt import (DEPRECATED_USE, BuildOptions, EngineMeta, EngineMismatchError,
                                          build_serialized, calibration_facts, check_compatible, entropy_calibrator,
                                          int8_plan, read_meta, write_meta)
from irep_deploy.errors import IrepError

from . import trt_standins
from .conftest import cli, leftovers, one_line_error
from .trt_standins import args_of, called, used

SHAPES = dict(min_shape=(1, 1, 28, 28), opt_shape=(8, 1, 28, 28), max_shape=(32, 1, 28, 28))


def _build(version, calibrator_images=None, cache=b"", **kw):
    trt, log = trt_standins.make(version)
    calibrator = None
    if calibrator_images is not None:
        calibrator = entropy_calibrator(trt, calibrator_images, 32, cache, device="cpu")
    options = BuildOptions(**dict(SHAPES, int8=True, calibrator=calibrator, **kw))
    return trt, log, build_serialized(trt, b"onnx", "input", options), calibrator


def deprecated_used(trt, log):
    assert not used(log) & trt_standins.LEGACY_8
    return used(log) & trt_standins.deprecated(trt)


@pytest.fixture(scope="module")
def images():
    return int8_tools.calibration_images("fashion-mnist", (1, 28, 28), 70, source="test")


@pytest.mark.parametrize("version, plan", [("8.5.2.2", "flag"), ("10.3.0", "strong"), ("10.12.0", "strong"),
                                           ("11.0.0", "strong")])
def test_qdq_onnx(version, plan):
    trt, log, result, _ = _build(version, qdq=True)
    assert int8_plan(trt, qdq=True, fp16=False) == plan
    flags = args_of(log, "Builder.create_network")[0][0]
    set_flags = args_of(log, "IBuilderConfig.set_flag")
    if version.startswith("11."):  # strongly typed anyway: the flag, deprecated in 11.0, is not set
        assert flags == 0 and result.strongly_typed and set_flags == []
    elif plan == "strong":  # the Q/DQ nodes decide precisions: no precision flag at all
        assert flags == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED and result.strongly_typed
        assert set_flags == []
    else:
        assert flags == 1 << trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH and not result.strongly_typed
        assert set_flags == [(trt.BuilderFlag.INT8,)]
    assert args_of(log, "IBuilderConfig.clear_flag") == [(trt.BuilderFlag.TF32,)]  # float layers are FP32
    assert not any(n.startswith("IBuilderConfig.int8_calibrator") for n in called(log))
    assert deprecated_used(trt, log) == set()


@pytest.mark.parametrize("version", ["8.5.2.2", "10.3.0", "10.12.0"])
def test_qdq_with_fp16_fallback_uses_weak_typing_where_it_exists(version):
    trt, log, result, _ = _build(version, qdq=True, fp16=True)
    assert args_of(log, "IBuilderConfig.set_flag") == [(trt.BuilderFlag.INT8,), (trt.BuilderFlag.FP16,)]
    assert args_of(log, "Builder.create_network")[0][0] in (0, 1)  # no STRONGLY_TYPED: it forbids the flags
    assert not result.strongly_typed
    # weak typing is deprecated from 10.12 on and kept until 11 removes it (DEPRECATED_USE)
    weak = {"BuilderFlag.INT8", "BuilderFlag.FP16"}
    assert deprecated_used(trt, log) == (weak if version == "10.12.0" else set())


def test_qdq_with_fp16_is_refused_on_11():
    with pytest.raises(IrepError, match="drop --fp16") as info:
        _build("11.0.0", qdq=True, fp16=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("version", ["8.5.2.2", "10.3.0", "10.12.0"])
def test_float_onnx_gets_the_entropy_calibrator(version, images):
    trt, log, result, calibrator = _build(version, calibrator_images=images)
    assert ("IBuilderConfig.int8_calibrator=", (calibrator,)) in log
    assert args_of(log, "IBuilderConfig.set_flag") == [(trt.BuilderFlag.INT8,)]
    # calibration runs at one fixed shape: the calibrator's batch
    profiles = args_of(log, "IOptimizationProfile.set_shape")
    assert profiles[-1] == ("input", (32, 1, 28, 28), (32, 1, 28, 28), (32, 1, 28, 28))
    assert "IBuilderConfig.set_calibration_profile" in called(log)
    # the stand-in drove it like TensorRT: 70 images -> 2 whole batches, then a table to cache
    assert calibrator.fed == 2 and len(trt.state["calib_pointers"]) == 2
    assert calibrator.cache_out == b"TRT-8501-EntropyCalibration2 table"
    assert not result.strongly_typed
    # implicit calibration is deprecated from 10.1 on (weak typing from 10.12) and kept until 11 (DEPRECATED_USE)
    calibration = {"IInt8EntropyCalibrator2", "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile"}
    expected = {"8.5.2.2": set(), "10.3.0": calibration, "10.12.0": calibration | {"BuilderFlag.INT8"}}[version]
    assert deprecated_used(trt, log) == expected and expected <= set(DEPRECATED_USE)


@pytest.mark.parametrize("version", ["8.5.2.2", "10.3.0"])
def test_calibrator_subclass_must_initialise_its_base(version):
    """As pybind11 makes the real base class: a subclass that skips its __init__ is a TypeError."""
    trt, _ = trt_standins.make(version)

    class Skips(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            self.batch = 32

    with pytest.raises(TypeError, match="IInt8EntropyCalibrator2.__init__\\(\\) must be called"):
        Skips()
    assert isinstance(entropy_calibrator(trt, np.zeros((32, 1, 28, 28), np.float32), 32, device="cpu"),
                      trt.IInt8EntropyCalibrator2)


def test_implicit_calibration_is_refused_on_11(images):
    trt, _ = trt_standins.make("11.0.0")
    with pytest.raises(IrepError, match="TensorRT 11.0.0 removed implicit INT8 calibration") as info:
        build_serialized(trt, b"onnx", "input", BuildOptions(**dict(SHAPES, int8=True)))
    assert "quantize the ONNX to QDQ" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(AttributeError):  # the stand-in really has no calibrator base class
        entropy_calibrator(trt, images, 32, device="cpu")


def test_get_batch_feeds_real_batches_then_none(images):
    trt, _ = trt_standins.make("8.5.2.2")
    calibrator = entropy_calibrator(trt, images, 32, device="cpu")
    assert isinstance(calibrator, trt.IInt8EntropyCalibrator2) and calibrator.get_batch_size() == 32
    assert calibrator.read_calibration_cache() is None
    for i in range(2):
        pointers = calibrator.get_batch(["input"])
        held = calibrator.current
        assert pointers == [held.data_ptr()] and tuple(held.shape) == (32, 1, 28, 28)
        assert torch.equal(held, torch.from_numpy(images[32 * i:32 * (i + 1)]))
    assert calibrator.get_batch(["input"]) is None  # 6 images left: not a whole batch
    # real normalised Fashion-MNIST, not noise: a black pixel is -mean/std and images differ
    assert abs(float(images.min()) + 0.2860 / 0.3530) < 1e-5 and not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("version", ["8.5.2.2", "10.3.0"])
def test_cache_is_offered_first_and_skips_calibration(version, images):
    trt, _, _, calibrator = _build(version, calibrator_images=images, cache=b"old table")
    assert trt.state["calib_cache_read"] == b"old table"
    assert calibrator.fed == 0 and "calib_pointers" not in trt.state
    facts = calibration_facts(None, False, calibrator, "fashion-mnist", "calib.cache")
    assert facts["from_cache"] and facts["images"] == 0
    assert facts["cache_sha256"] == hashlib.sha256(b"old table").hexdigest()


def test_calibration_facts_without_cache(images):
    _, _, _, calibrator = _build("10.3.0", calibrator_images=images)
    facts = calibration_facts(None, False, calibrator, "fashion-mnist", None)
    assert facts == {"method": "entropy2", "dataset": "fashion-mnist", "split": "train", "images": 64,
                     "batch": 32, "from_cache": False, "cache_path": None,
                     "cache_sha256": hashlib.sha256(b"TRT-8501-EntropyCalibration2 table").hexdigest()}


def test_int8_meta_roundtrip_and_rebuild_command(tmp_path):
    meta = EngineMeta("10.3.0", "Orin", "8.7", "int8", "input", "logits", [1, 1, 28, 28], [8, 1, 28, 28],
                      [32, 1, 28, 28], "ab" * 32, "model.onnx",
                      calibration={"method": "entropy2", "dataset": "fashion-mnist", "images": 512})
    write_meta(tmp_path / "m.engine", meta)
    assert read_meta(tmp_path / "m.engine") == meta
    with pytest.raises(EngineMismatchError, match="--int8 --calib fashion-mnist"):
        check_compatible(meta, "m.engine", "10.3.0", "Xavier", "7.2")


def test_qdq_facts_keep_the_onnx_metadata(fmnist_qdq):
    model = onnx.load(str(fmnist_qdq))
    onnx.helper.set_model_props(model, {"irep_deploy.quantize": "minmax per-channel"})
    assert calibration_facts(model, True, None, None, None) == {
        "method": "qdq", "onnx_metadata": {"irep_deploy.quantize": "minmax per-channel"}}


# -- the CLI: argument errors come before TensorRT, so they are checked on any machine ------------------
@pytest.mark.parametrize("argv, msg, code", [
    (["{float}", "--int8"], "needs --calib DATASET", 2),
    (["{float}", "--calib", "fashion-mnist"], "--calib applies to --int8", 2),
    (["{float}", "--calib-cache", "{dir}/c.cache"], "--calib-cache applies to --int8", 2),
    (["{qdq}"], "quantized (QDQ) ONNX; build it with --int8", 1),
    (["{qdq}", "--int8", "--calib-cache", "{dir}/c.cache"], "nothing to calibrate", 1),
    (["{qdq}", "--int8", "--verify"], "--verify of an INT8 engine compares on real images", 2),
    (["{float}", "--int8", "--calib", "fashion-mnist", "--calib-size", "10"], "too few images", 2),
    (["{other}", "--int8", "--calib", "fashion-mnist"], "calibration data of the wrong shape", 1),
    (["{float}", "--int8", "--calib", "fashion-mnist", "--data-root", "{dir}/none"], "no such directory", 1),
])
def test_build_trt_int8_argument_errors(fmnist, fmnist_qdq, fused_onnx, tmp_path, capsys, argv, msg, code):
    names = {"float": str(fmnist["onnx"]), "qdq": str(fmnist_qdq), "other": str(fused_onnx), "dir": str(tmp_path)}
    argv = [a.format(**names) for a in argv] + ["-o", str(tmp_path / "m.engine")]
    rc, out, err = cli(capsys, "build-trt", *argv)
    assert rc == code and msg in one_line_error(err), err
    assert leftovers(tmp_path, ["m.engine", "m.engine.json", "c.cache"]) == []


def test_build_trt_unknown_calib_dataset_is_a_usage_error(fmnist, tmp_path, capsys):
    rc, _, err = cli(capsys, "build-trt", fmnist["onnx"], "--int8", "--calib", "mnist", "-o", tmp_path / "m.engine")
    assert rc == 2 and "--calib" in one_line_error(err)
