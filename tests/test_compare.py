"""irep_deploy.compare: the one comparator, on arrays whose measures are known by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from irep_deploy.compare import (FUSE_FP32, INT8_REAL, ONNX_EXPORT, TOLERANCES, TRT_FP16, TRT_FP32, Tolerance,
                                 compare)
from irep_deploy.errors import VerificationError

REF = np.array([[1.0, -2.0, 4.0], [0.5, 3.0, -1.0]])


def test_measures_of_known_arrays():
    got = REF.copy()
    got[0, 0] = 4.5  # one value off by 3.5 (the largest |reference| is 4), and row 0's class 2 becomes 0
    check = compare(REF, got)
    assert check.max_abs_error == 3.5 and check.rel_error == 0.875
    want_cos = float(REF.ravel() @ got.ravel()) / (np.linalg.norm(REF) * np.linalg.norm(got))
    assert check.cosine == pytest.approx(want_cos, abs=1e-15) and check.cosine < 1
    assert check.top1_agreement == 0.5 and check.top1_differ == 1 and check.examples == 2
    assert check.passed  # no tolerance: measured only


def test_identical_outputs_and_float_tolerance():
    check = compare(REF, REF.copy(), 0.0)
    assert (check.max_abs_error, check.rel_error, check.cosine, check.top1_agreement) == (0.0, 0.0, 1.0, 1.0)
    assert check.passed and check.tolerance.max_rel_error == 0.0


@pytest.mark.parametrize("limit, passed", [(0.125, True), (float(np.nextafter(0.125, 0.0)), False)])
def test_relative_error_boundary_is_inclusive(limit, passed):
    got = REF.copy()
    got[1, 1] += 0.5  # 0.5 / max|ref| 4 = 0.125 exactly
    check = compare(REF, got, limit)
    assert check.rel_error == 0.125 and check.passed is passed
    if not passed:
        assert check.failures == ("relative error 0.125 > tolerance 0.125",)  # printed to 3 digits
        assert check.summary.endswith(": FAILED (relative error 0.125 > tolerance 0.125)")


def test_cosine_and_agreement_limits():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    b = a.copy()
    b[0] = [0.0, 1.0]  # one of four rows changes its class: agreement 0.75, cosine 3/4
    check = compare(a, b, Tolerance("t", min_cosine=0.75, min_agreement=0.75))
    assert check.cosine == pytest.approx(0.75) and check.top1_agreement == 0.75 and check.passed
    strict = compare(a, b, Tolerance("t", min_cosine=0.76, min_agreement=0.76))
    assert not strict.passed and len(strict.failures) == 2
    assert strict.failures[0].startswith("cosine 0.750000 < 0.76")
    assert strict.failures[1] == "top-1 agreement 75.00% < 76.00% (1 of 4 differ)"
    assert compare(a, -a).cosine == -1.0  # opposite directions


def test_zero_outputs():
    zero = np.zeros((2, 3))
    assert compare(zero, zero, FUSE_FP32).passed and compare(zero, zero).cosine == 1.0
    check = compare(zero, np.full((2, 3), 1e-4), FUSE_FP32)  # all-zero reference: absolute error
    assert check.rel_error == 1e-4 and not check.passed and check.cosine == 0.0


@pytest.mark.parametrize("where", ["reference", "output"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_never_passes(where, bad):
    other = REF.copy()
    other[0, 0] = bad
    ref, got = (other, REF) if where == "reference" else (REF, other)
    for tolerance in (None, 1.0, Tolerance("cos", min_cosine=-1.0)):  # even limits anything meets
        check = compare(ref, got, tolerance)
        assert not check.passed and check.failures == ("NaN or inf in the {}".format(where),), tolerance
        assert not check.finite and "FAILED" in check.summary


def test_shape_mismatch_is_one_line_verification_error():
    with pytest.raises(VerificationError, match=r"outputs differ in shape: \(2, 3\) vs \(3, 2\)"):
        compare(REF, REF.T.copy())
    with pytest.raises(VerificationError):
        compare(np.zeros((4, 10)), np.zeros((4, 10, 1)))


def test_torch_tensors_of_any_dtype():
    ref = torch.tensor(REF, dtype=torch.float32, requires_grad=True) * 1  # part of a graph
    got = ref.detach().to(torch.bfloat16)
    check = compare(ref, got, ONNX_EXPORT)
    # bfloat16 keeps 8 significant bits; these values are exact in it, so nothing differs
    assert check.max_abs_error == 0.0 and check.passed
    shifted = (ref.detach() + 1e-3).half()  # float16 rounds 1e-3 away near 4 (spacing 2**-8), not near 0.5
    half = compare(ref, shifted, TRT_FP32)
    assert half.max_abs_error == float((shifted.double() - ref.detach().double()).abs().max()) and half.passed
    assert half.rel_error == half.max_abs_error / 4 and 0 < half.rel_error < 1e-3


def test_agreement_needs_a_batch_axis():
    vec = np.array([1.0, 2.0])
    assert compare(vec, vec).top1_agreement is None and compare(vec, vec).examples == 2
    with pytest.raises(ValueError, match="batch axis"):
        compare(vec, vec, INT8_REAL)


def test_named_tolerances():
    assert set(TOLERANCES) >= {"fuse-fp32", "onnx-export", "tensorrt-fp32", "tensorrt-fp16", "int8-real-images"}
    assert FUSE_FP32.max_rel_error < ONNX_EXPORT.max_rel_error < TRT_FP32.max_rel_error
    assert TRT_FP16.min_cosine > INT8_REAL.min_cosine and INT8_REAL.min_agreement == 0.95
    assert TRT_FP16.but(min_cosine=None) == TRT_FP16 and TRT_FP16.but(min_cosine=0.5).min_cosine == 0.5


def test_as_dict_and_summary():
    check = compare(REF, REF + 0.5)
    d = check.as_dict()
    assert d["max_abs_error"] == 0.5 and d["rel_error"] == 0.125 and d["examples"] == 2.0
    assert d["top1_agreement"] == 1.0 and d["top1_differ"] == 0.0
    assert check.summary.startswith("max abs error 0.5, relative error 0.125, cosine 0.9") and check.summary.endswith(
        ": passed")
    assert "\n" not in check.summary


def test_a_failed_cosine_never_prints_as_its_limit():
    a = np.array([[1.0, 0.0]])
    check = compare(a, np.array([[1.0, 3e-4]]), Tolerance("t", min_cosine=1.0))  # cosine 1 - 4.5e-8
    assert not check.passed and check.failures == ("cosine 0.99999996 < 1.0",)
