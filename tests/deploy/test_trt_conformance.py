"""The TensorRT names irep-deploy uses and the stand-ins offer, checked against the real bindings.

tests/deploy/trt_api/tensorrt-VERSION.json are API surfaces recorded from NVIDIA's real Python
bindings (8.5 to 11.x) by tools/record_trt_api.py: module names, enums with values, classes with
members, the deprecation marks of their docstrings, and GPU-free probes. No TensorRT is needed here.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest

from irep_deploy.engines import tensorrt as trt_engine
from irep_deploy.engines.tensorrt import DEPRECATED_USE, BuildOptions, build_serialized, execute, io_names

from . import trt_standins
from .trt_standins import StreamStandIn, parse_version, recorded, used

ROOT = Path(__file__).resolve().parents[2]
SURFACE_DIR = Path(__file__).resolve().parent / "trt_api"
VERSIONS = sorted((json.loads(p.read_text())["version"] for p in SURFACE_DIR.glob("tensorrt-*.json")),
                  key=lambda v: [int(x) for x in v.split(".")])
_CACHE: Dict[str, Dict[str, Any]] = {}

# Every TensorRT name the package uses, with the versions on which the code uses it: "all", "<10",
# "<11", "10" (10.x only), or "probed" (only looked up with hasattr/getattr, so absence is handled).
# test_the_list_is_what_the_code_uses keeps it equal to what the code references.
USED = {
    "__version__": "all", "Logger": "all", "Logger.WARNING": "all", "Builder": "all", "OnnxParser": "all",
    "Runtime": "all", "IInt8EntropyCalibrator2": "<11", "MemoryPoolType.WORKSPACE": "all",
    "DeviceType.DLA": "all", "TensorIOMode.INPUT": "all", "BuilderFlag": "all", "DataType": "all",
    "DeviceType": "all", "MemoryPoolType": "all", "NetworkDefinitionCreationFlag": "all", "TensorIOMode": "all",
    "NetworkDefinitionCreationFlag.EXPLICIT_BATCH": "<10", "NetworkDefinitionCreationFlag.STRONGLY_TYPED": "10",
    "BuilderFlag.FP16": "<11", "BuilderFlag.INT8": "<11", "BuilderFlag.TF32": "all",
    "BuilderFlag.GPU_FALLBACK": "all",
    "DataType.FLOAT": "probed", "DataType.HALF": "probed", "DataType.INT32": "probed", "DataType.INT8": "probed",
    "DataType.BOOL": "probed", "DataType.INT64": "probed", "DataType.BF16": "probed",
    "Builder.create_network": "all", "Builder.create_builder_config": "all",
    "Builder.create_optimization_profile": "all", "Builder.build_serialized_network": "all",
    "Builder.num_DLA_cores": "all",
    "OnnxParser.parse": "all", "OnnxParser.num_errors": "all", "OnnxParser.get_error": "all",
    "IBuilderConfig.set_memory_pool_limit": "all", "IBuilderConfig.set_flag": "all",
    "IBuilderConfig.clear_flag": "all", "IBuilderConfig.int8_calibrator": "<11",
    "IBuilderConfig.default_device_type": "all", "IBuilderConfig.DLA_core": "all",
    "IBuilderConfig.add_optimization_profile": "all", "IBuilderConfig.set_calibration_profile": "<11",
    "IBuilderConfig.create_timing_cache": "all", "IBuilderConfig.set_timing_cache": "all",
    "IBuilderConfig.get_timing_cache": "all", "IOptimizationProfile.set_shape": "all",
    "ITimingCache.serialize": "all", "Runtime.deserialize_cuda_engine": "all",
    "ICudaEngine.create_execution_context": "all", "ICudaEngine.num_io_tensors": "all",
    "ICudaEngine.get_tensor_name": "all", "ICudaEngine.get_tensor_mode": "all",
    "ICudaEngine.get_tensor_dtype": "all",
    "IExecutionContext.set_input_shape": "all", "IExecutionContext.set_tensor_address": "all",
    "IExecutionContext.get_tensor_shape": "all", "IExecutionContext.execute_async_v3": "all",
    # the calibrator's overrides: TensorRT calls them only if the base class declares them
    "IInt8EntropyCalibrator2.get_batch_size": "<11", "IInt8EntropyCalibrator2.get_batch": "<11",
    "IInt8EntropyCalibrator2.read_calibration_cache": "<11", "IInt8EntropyCalibrator2.write_calibration_cache": "<11",
}
# parameters whose TensorRT class the code's annotations (Any) do not say
PARAMETER_TYPES = {"builder": "Builder", "config": "IBuilderConfig", "engine": "ICudaEngine",
                   "context": "IExecutionContext"}


def surface(version: str) -> Dict[str, Any]:
    if version not in _CACHE:
        _CACHE[version] = json.loads((SURFACE_DIR / "tensorrt-{}.json".format(version)).read_text())
    return _CACHE[version]


def real_names(version: str) -> Dict[str, Optional[int]]:
    s = surface(version)
    names: Dict[str, Optional[int]] = {n: None for n in s["module"]}
    for enum, entry in s["enums"].items():
        names.update({"{}.{}".format(enum, m): v for m, v in entry["members"].items()})
    for cls, entry in s["classes"].items():
        names.update({"{}.{}".format(cls, m): None for m in entry["members"]})
    return names


def real_deprecated(version: str) -> Dict[str, str]:
    s = surface(version)
    marks = dict(s["deprecated"])
    for kind in ("enums", "classes"):
        for owner, entry in s[kind].items():
            marks.update({"{}.{}".format(owner, m): since for m, since in entry.get("deprecated", {}).items()})
    return marks


def in_range(version: str, spec: str) -> bool:
    major = parse_version(version)[0]
    return {"all": True, "probed": True, "<10": major < 10, "<11": major < 11, "10": major == 10}[spec]


# -- the recordings themselves -----------------------------------------------------------------------
def test_recorded_surfaces_cover_the_supported_versions():
    majors = [parse_version(v) for v in VERSIONS]
    assert (8, 5) in majors and (8, 6) in majors
    assert len({m for m in majors if m[0] == 10}) >= 3 and any(m[0] == 11 for m in majors)
    for version in VERSIONS:
        s = surface(version)
        assert s["recorded_from"]["wheel"].split("-")[1].startswith(version) and len(s["classes"]) > 90
        # the module as the package builds it: __init__.py's names are there (Logger.WARNING comes from it)
        assert "WARNING" in s["classes"]["Logger"]["members"] and s["module"]["__version__"] == "value str"


# -- the stand-ins against the recordings ------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_standin_offers_only_real_names_with_real_values(version):
    trt, _ = trt_standins.make(version)
    real = real_names(version)
    offered = trt_standins.provided(trt)
    missing = sorted(n for n in offered if n not in real)
    assert missing == [], "the {} stand-in offers what TensorRT {} lacks".format(version, version)
    wrong = {n: (v, real[n]) for n, v in offered.items() if v is not None and v != real[n]}
    assert wrong == {}, "enum values differ from the real ones (stand-in, real)"


def test_what_the_standins_call_removed_is_gone_from_the_real_ones():
    """The 8.x-only API the tests forbid (LEGACY_8) and the flags 11 dropped are really gone there."""
    for version in VERSIONS:
        real, major = real_names(version), parse_version(version)[0]
        assert {n for n in trt_standins.LEGACY_8 if n in real} == (trt_standins.LEGACY_8 if major < 10 else set())
        removed = {"BuilderFlag." + f for f in trt_standins.REMOVED_IN_11}
        assert {n for n in removed if n in real} == (removed if major < 11 else set())


@pytest.mark.parametrize("version", VERSIONS)
def test_standin_deprecation_marks_are_the_real_ones(version):
    trt, _ = trt_standins.make(version)
    offered = trt_standins.provided(trt)
    real = {n for n in real_deprecated(version) if n in offered}
    assert trt_standins.deprecated(trt) == real


@pytest.mark.parametrize("version", [v for v in VERSIONS if parse_version(v)[0] < 11])
def test_calibrator_base_needs_its_init_like_the_real_one(version):
    probes = surface(version)["classes"]["IInt8EntropyCalibrator2"]["probes"]
    trt, _ = trt_standins.make(version)
    base = trt.IInt8EntropyCalibrator2

    def outcome(init):
        try:
            type("Probe", (base,), {"__init__": init})()
        except TypeError as exc:
            return "TypeError: " + str(exc)
        return "accepted"

    assert outcome(lambda self: base.__init__(self)) == probes["subclass_with_base_init"] == "accepted"
    assert outcome(lambda self: None) == probes["subclass_without_base_init"]


# -- the code against the recordings -----------------------------------------------------------------
def _returns(cls: str, member: str) -> Optional[str]:
    """The class a method returns, by the newest recorded signature that has it."""
    for version in reversed(VERSIONS):
        kind = surface(version)["classes"].get(cls, {}).get("members", {}).get(member, "")
        found = re.search(r"-> (\w+)", kind)
        if found:
            return found.group(1)
    return None


class _Collector(ast.NodeVisitor):
    """TensorRT names referenced by a module, following the module object ``trt`` through calls and
    assignments (return types from the recorded signatures) and a few parameters by name."""

    def __init__(self, classes: Set[str], enums: Set[str]) -> None:
        self.classes, self.enums = classes, enums
        self.env: Dict[str, str] = {}
        self.names: Set[str] = set()
        self.dynamic: Set[str] = set()  # hasattr/getattr with a computed name: owner only

    def type_of(self, node: ast.AST) -> Optional[str]:
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and "self." + node.attr in self.env:
                return self.env["self." + node.attr]
            return self.member(self.type_of(node.value), node.attr)
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "require_tensorrt":
                return "module"
            if isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2:
                owner = self.type_of(node.args[0])
                if owner and isinstance(node.args[1], ast.Constant):
                    return self.member(owner, node.args[1].value)
                if owner:
                    self.dynamic.add(owner)
                return None
            kind = self.type_of(node.func)
            if kind and kind.startswith("class:"):
                return "obj:" + kind[6:]
            if kind and kind.startswith("method:"):
                ret = _returns(*kind[7:].split(".", 1))
                return "obj:" + ret if ret in self.classes else None
        return None

    def member(self, owner: Optional[str], attr: str) -> Optional[str]:
        if owner is None or attr.startswith("__") and attr != "__version__":
            return None
        if owner == "module":
            self.names.add(attr)
            if attr in self.enums:
                return "enum:" + attr
            return "class:" + attr if attr in self.classes else None
        name = owner.split(":", 1)[1]
        self.names.add("{}.{}".format(name, attr))
        if owner.startswith("obj:") and _returns(name, attr):
            return "method:{}.{}".format(name, attr)
        return None

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        outer = dict(self.env)
        params = [arg.arg for arg in node.args.args]
        for name in params:  # a parameter hides the outer name; the TensorRT ones are typed below
            self.env.pop(name, None)
        for name in params:
            if name == "trt":
                self.env[name] = "module"
            elif name in PARAMETER_TYPES and "trt" in params:
                self.env[name] = "obj:" + PARAMETER_TYPES[name]
        self.generic_visit(node)
        self.env = dict(outer, **{k: v for k, v in self.env.items() if k.startswith("self.")})

    def bind(self, target: ast.AST, kind: Optional[str]) -> None:
        if isinstance(target, ast.Name):
            if kind:
                self.env[target.id] = kind
            else:
                self.env.pop(target.id, None)
        elif isinstance(target, ast.Attribute):
            if isinstance(target.value, ast.Name) and target.value.id == "self":
                if kind:
                    self.env["self." + target.attr] = kind
            else:
                self.member(self.type_of(target.value), target.attr)  # a property written

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple) and \
                    len(target.elts) == len(node.value.elts):
                for one, value in zip(target.elts, node.value.elts):
                    self.bind(one, self.type_of(value))
            elif isinstance(target, ast.Tuple):
                for one in target.elts:
                    self.bind(one, None)
            else:
                self.bind(target, self.type_of(node.value))
        self.visit(node.value)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "tensorrt":
                self.env[alias.asname or alias.name] = "module"

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for base in node.bases:
            kind = self.type_of(base)
            if kind and kind.startswith("class:"):  # overrides of a TensorRT class's virtual methods
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                        self.names.add("{}.{}".format(kind[6:], item.name))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.type_of(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        self.type_of(node)
        self.generic_visit(node)


def code_names() -> Tuple[Set[str], Set[str]]:
    classes = {c for v in VERSIONS for c in surface(v)["classes"]}
    enums = {e for v in VERSIONS for e in surface(v)["enums"]}
    names: Set[str] = set()
    dynamic: Set[str] = set()
    for path in sorted((ROOT / "irep_deploy").rglob("*.py")):
        text = path.read_text()
        if "trt" not in text and "tensorrt" not in text:  # no way to reach the module: skip the parse
            continue
        collector = _Collector(classes, enums)
        tree = ast.parse(text)
        for _ in range(2):  # the second pass sees attributes of self assigned in later methods
            collector.visit(tree)
        names |= collector.names
        dynamic |= collector.dynamic
    return names, dynamic


def test_the_list_is_what_the_code_uses():
    names, dynamic = code_names()
    assert dynamic == {"enum:DataType"}  # torch_dtype's table, checked below
    names |= {"DataType." + n for n, _ in trt_engine._DTYPES}
    assert sorted(names - set(USED)) == [], "the code uses TensorRT names that USED does not list"
    assert sorted(set(USED) - names) == [], "USED lists names the code no longer uses"


@pytest.mark.parametrize("name, spec", sorted(USED.items()))
def test_every_used_name_exists_where_it_is_used(name, spec):
    where = [v for v in VERSIONS if name in real_names(v)]
    if spec == "probed":
        assert where, "{} exists in no recorded TensorRT: the lookup can never succeed".format(name)
    else:
        assert [v for v in VERSIONS if in_range(v, spec)] == [v for v in where if in_range(v, spec)]


def test_deprecated_names_in_use_are_the_documented_ones():
    found: Dict[str, str] = {}
    for version in VERSIONS:
        marks = real_deprecated(version)
        for name, spec in USED.items():
            if spec != "probed" and in_range(version, spec) and name in marks:
                found.setdefault(name, marks[name])
    assert found == {name: since for name, (since, _, _) in DEPRECATED_USE.items()}
    for name, (_, removed, _) in DEPRECATED_USE.items():  # and gone where the table says
        assert all(name not in real_names(v) for v in VERSIONS if parse_version(v) >= parse_version(removed))


def test_docs_list_each_deprecated_call_with_its_versions():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for name, (since, removed, _) in DEPRECATED_USE.items():
        rows = [line for line in text.splitlines() if "`{}`".format(name) in line and line.startswith("|")]
        assert any(since in row and removed in row for row in rows), name


# -- the code's paths on a stand-in of every recorded version ----------------------------------------
SHAPES = dict(min_shape=(1, 3, 32, 32), opt_shape=(4, 3, 32, 32), max_shape=(32, 3, 32, 32))
PATHS = {"fp32": {}, "fp16": {"fp16": True}, "qdq": {"int8": True, "qdq": True},
         "qdq+fp16": {"int8": True, "qdq": True, "fp16": True}, "calibrate": {"int8": True},
         "dla": {"fp16": True, "dla_core": 0}}


def _calibrator(trt: Any) -> Any:
    import numpy as np
    return trt_engine.entropy_calibrator(trt, np.zeros((64, 3, 32, 32), np.float32), 32, device="cpu")


@pytest.mark.parametrize("version", VERSIONS)
def test_every_path_uses_real_names_and_only_documented_deprecated_ones(version):
    real = real_names(version)
    marks = real_deprecated(version)
    ran = []
    for path, kw in PATHS.items():
        trt, log = trt_standins.make(version, dla_cores=2)
        if path == "calibrate" and not hasattr(trt, "IInt8EntropyCalibrator2") or \
                path == "qdq+fp16" and not trt_engine.weak_typing(trt):
            continue  # refused in one line on this version (test_trt_int8.py)
        if path == "calibrate":
            kw = dict(kw, calibrator=_calibrator(trt))
        build_serialized(trt, b"onnx", "input", BuildOptions(**dict(SHAPES, **kw)))
        engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(trt_standins.PLAN)
        inputs, outputs = io_names(trt, engine)
        import torch
        execute(trt, engine, engine.create_execution_context(), {"input": recorded(torch.zeros(2, 3, 32, 32))},
                outputs, StreamStandIn(), lambda s, d: recorded(torch.empty(s, dtype=d)))
        names = used(log)
        assert sorted(n for n in names if n not in real) == [], path
        deprecated = {n: marks[n] for n in names if n in marks}
        assert set(deprecated) <= set(DEPRECATED_USE), (path, deprecated)
        ran.append(path)
    assert len(ran) == {8: 6, 10: 6, 11: 4}[parse_version(version)[0]]
