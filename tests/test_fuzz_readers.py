"""Fuzzed architecture-code files and engine sidecars (issue 10): whatever the bytes, the readers
raise only the project's own error types, with one bounded line, in bounded memory."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irep_deploy import ArchCode
from irep_deploy.engines.tensorrt import EngineMeta, read_meta
from irep_deploy.errors import ArchFormatError, IrepError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
VALID = ArchCode.random("resnet18_cifar", ratio=0.5, seed=1).dumps()
LINES = VALID.splitlines()
SIDECAR = {"format": "irep-deploy-engine", "format_version": 1, "tensorrt_version": "10.0", "gpu_name": "GPU",
           "compute_capability": "8.0", "precision": "fp32", "input_name": "input", "output_name": "logits",
           "min_shape": [1, 3, 32, 32], "opt_shape": [1, 3, 32, 32], "max_shape": [8, 3, 32, 32],
           "onnx_sha256": "0" * 64}
MEMORY_LIMIT = 16 << 20  # bytes a reader may allocate for inputs of a few KB


def _bounded(call):
    """Run ``call``; return the IrepError it raised (or None) and assert the peak allocation."""
    tracemalloc.start()
    try:
        try:
            call()
            error = None
        except IrepError as exc:
            error = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT
    if error is not None:
        text = str(error)
        assert "\n" not in text.strip() and len(text) < 600, text[:1000]
    return error


def _mutated_code():
    line = st.one_of(st.sampled_from(LINES), st.text(max_size=60),
                     st.sampled_from(["version: 2", "backbone: nope", "ops:", "ops: bogus", "version: 1",
                                      "layer1.0.conv1 1111111", "x" * 500, "\x00", "a: b: c", "# comment"]))
    edits = st.lists(st.tuples(st.integers(0, len(LINES)), line), max_size=4)
    drops = st.sets(st.integers(0, len(LINES) - 1), max_size=4)

    def build(args):
        e, d = args
        lines = [l for i, l in enumerate(LINES) if i not in d]
        for pos, text in e:
            lines.insert(min(pos, len(lines)), text)
        return "\n".join(lines)
    return st.tuples(edits, drops).map(build)


@FUZZ
@given(data=st.one_of(st.binary(max_size=4096), _mutated_code().map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_fuzzed_arch_files_raise_only_arch_format_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("arch") / "arch.bin"
    path.write_bytes(data)
    error = _bounded(lambda: ArchCode.load(path))
    assert error is None or isinstance(error, ArchFormatError)
    if error is not None:
        assert str(path) in str(error)


@FUZZ
@given(text=_mutated_code())
def test_fuzzed_arch_text_round_trips_or_is_refused(text):
    try:
        code = ArchCode.loads(text, source="fuzz")
    except ArchFormatError as exc:
        assert str(exc).startswith("fuzz:")
        return
    assert ArchCode.loads(code.dumps()) == code


_json = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=30),
                     lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                     max_leaves=20)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(SIDECAR) + ["extra", "dla_core", "workspace_mb"]), _json,
                               max_size=4),
       drop=st.sets(st.sampled_from(sorted(SIDECAR)), max_size=2))
def test_fuzzed_sidecar_fields_give_meta_or_one_irep_error(tmp_path_factory, changes, drop):
    engine = tmp_path_factory.mktemp("eng") / "m.engine"
    raw = {k: v for k, v in dict(SIDECAR, **changes).items() if k not in drop}
    Path(str(engine) + ".json").write_text(json.dumps(raw))
    result = []
    error = _bounded(lambda: result.append(read_meta(engine)))
    if error is None:
        meta = result[0]
        assert isinstance(meta, EngineMeta)
        assert all(isinstance(d, int) and d >= 1 for d in meta.opt_shape) and len(meta.opt_shape) == 4
    else:
        assert str(engine) in str(error)


@FUZZ
@given(data=st.binary(max_size=2048) | st.text(max_size=300).map(str.encode))
def test_fuzzed_sidecar_bytes_give_one_irep_error(tmp_path_factory, data):
    engine = tmp_path_factory.mktemp("eng") / "m.engine"
    Path(str(engine) + ".json").write_bytes(data)
    assert _bounded(lambda: read_meta(engine)) is not None


def test_deeply_nested_sidecar_is_an_error_not_a_recursion_crash(tmp_path):
    engine = tmp_path / "m.engine"
    Path(str(engine) + ".json").write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(IrepError, match="m.engine.json"):
        read_meta(engine)


def test_oversized_sidecar_is_refused_before_parsing(tmp_path):
    engine = tmp_path / "m.engine"
    Path(str(engine) + ".json").write_text(json.dumps(dict(SIDECAR, gpu_name="x" * (2 << 20))))
    with pytest.raises(IrepError, match="larger than"):
        read_meta(engine)
