"""The network matrix: third-party networks from torchvision, timm and Ultralytics, and two custom
modules, each put through irepify -> random code -> fuse_model -> ONNX (issue 22).

One table (:data:`ENTRIES`) and one check (:func:`check_network`), shared by
``tests/test_network_matrix.py`` (which asserts each entry's expected outcome) and
``benchmarks/bench_networks.py`` (which records the numbers). Every entry is expected to end one of
two ways:

* ``"exact"``: ``irepify`` rewrites at least one 3x3 conv, and

  1. start: the irepified network (branches absent) equals the original in eval mode, relative
     error <= 1e-5 (:data:`irep_deploy.compare.FUSE_FP32`'s limit, measured by ``compare``);
  2. a random architecture code with branches (``ArchCode.random`` at 2/3 of the capacity) is
     created and every branch made non-zero (its BNs and the block's alpha/beta randomised, every
     BN's mean then calibrated on a random batch, :func:`calibrate`): the
     multi-branch output must then differ from the original's (relative difference > 1e-4, so the
     branches really are in the computation);
  3. ``fuse_model`` of it equals the multi-branch network in FP32, relative error <= 1e-5, and holds
     no ``IrepConv``; or, where float32 itself is that coarse (the multi-branch network, run in
     float32, is off its own float64 run by more than 5e-6), the fused float32 network is no
     farther from that float64 run than :data:`FLOOR_RATIO` times the multi-branch one
     (``Result.floor`` then records both): both are then float32 rounding of one function, and
     a wrong fusion is 1e-2 or more off float64;
  4. the fused network exported to ONNX has exactly the op types and counts of the plain original
     exported the same way (legacy exporter, opset 17, eval mode, constant folding); the plain
     original is the original itself, or for a network with its own re-parameterizable branches
     (timm's RepVGG and MobileOne) its deploy form (``entry.plain``: timm's
     ``reparameterize_model``), whose branches are folded too. This is what
     "no BatchNormalization and no branch op" means here: the exporter folds every conv -> BN pair
     of the original itself, so the original's graph has one Conv per conv and keeps only the
     BatchNormalization nodes no conv precedes (pre-activation BNs); a fused block that left a BN,
     a branch (an extra Conv, AveragePool, Pad) or its alpha/beta scaling (Mul, Add) in the graph
     shows up as a count that differs. ``Identity`` nodes are not counted: they compute nothing, and
     the exporter emits one per initializer it deduplicated, which differs between the two graphs;
  5. paths the entry names in ``must_rewrite`` became blocks and those in ``must_skip`` were left out
     with a reason in ``irep_report.skipped``.

* ``"refused"``: ``irepify`` raises an ``IrepError`` whose message contains every string of the
  entry's ``refusal`` (the module's path and the reason).

What is compared is the network's whole output (every tensor of a dict/tuple output), except for
torchvision detectors, whose eval output is post-processed (NMS, thresholds): there it is every
feature map of the backbone and every raw output of the heads on a fixed-size batch
(:class:`DetectorProbe`), which is also what is exported.
"""
from __future__ import annotations

import copy
import io
import os
import re
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from irep_deploy import ArchCode, IrepConv, apply_arch, fuse_model, irepify
from irep_deploy.compare import FUSE_FP32, compare
from irep_deploy.errors import IrepError
from irep_deploy.precision import exact_fp32
from irep_deploy.surgery import ineligible_reason

from conftest import randomize_arch_params, randomize_bn

TOL = FUSE_FP32.max_rel_error  # start and fused vs multi-branch, relative, FP32
# the float32 floor (check 3): where the float32 multi-branch network is off float64 by more than
# FLOOR_MIN, the fused one may be as far off, up to FLOOR_RATIO times (fcos_resnet50_fpn: 7.3e-6 and 8.7e-6)
FLOOR_MIN, FLOOR_RATIO = 5e-6, 2.0
BRANCH_EFFECT = 1e-4  # the least relative change the non-zero branches must make
OPSET = 17
NO_OPS = ("Identity",)  # nodes that compute nothing: the exporter emits them for initializers it deduplicated
SEED = 0


# -- the two custom modules ---------------------------------------------------------------------------
class TiedWeights(nn.Module):
    """Weight tying: ``a`` and ``b`` share one weight Parameter, and ``c``'s weight is also used through
    ``F.conv2d``. Neither can become one block (a block owns its kernel); ``stem`` and ``tail`` can."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a, self.a_bn = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b, self.b_bn = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b.weight = self.a.weight
        self.c, self.c_bn = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.tail, self.tail_bn = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.a_bn(self.a(x)))
        x = F.relu(self.b_bn(self.b(x)))
        x = F.relu(self.c_bn(self.c(x))) + F.conv2d(x, self.c.weight, padding=1)
        x = F.relu(self.tail_bn(self.tail(x)))
        return self.head(x.mean((2, 3)))


class ShapeGate(nn.Module):
    """torch.fx cannot trace this: its control flow depends on the input's shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            x = self.pool(x)
        return F.relu(self.bn(self.conv(x)))


class PartlyUntraceable(nn.Module):
    """A traceable network around one untraceable submodule: the convs outside it must not be blinded."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.gate = ShapeGate(16)
        self.tail = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tail(self.gate(F.relu(self.stem_bn(self.stem(x)))))
        return self.head(x.mean((2, 3)))


# -- what is compared and exported --------------------------------------------------------------------
def flatten(out: Any) -> List[torch.Tensor]:
    """Every tensor of a (nested) dict/list/tuple output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten(item)]
    return []


class Flat(nn.Module):
    """The network's output as a flat tuple of tensors (ONNX outputs are positional)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(flatten(self.model(x)))


class DetectorProbe(nn.Module):
    """A torchvision detector's backbone features and raw head outputs for a batch already at size
    (no transform, anchors or NMS): every conv of the detector is in this computation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = flatten(self.model.backbone(x))
        head = self.model.rpn.head if hasattr(self.model, "rpn") else self.model.head
        return tuple(features + flatten(head(features)))


# -- the table -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    name: str
    source: str  # torchvision, timm, ultralytics, custom
    build: Callable[[], nn.Module]
    shape: Tuple[int, ...]  # the input batch
    expected: str = "exact"  # or "refused"
    slow: bool = False  # more than about 5 s on one core: @pytest.mark.slow
    probe: Callable[[nn.Module], nn.Module] = Flat
    plain: Optional[Callable[[nn.Module], nn.Module]] = None  # the original in its deploy form (a copy)
    must_rewrite: Tuple[str, ...] = ()
    must_skip: Tuple[str, ...] = ()
    refusal: Tuple[str, ...] = ()  # substrings of the IrepError of a "refused" entry

    @property
    def requires(self) -> Optional[str]:
        """The optional package the builder imports (tests importorskip it)."""
        return {"timm": "timm", "ultralytics": "ultralytics"}.get(self.source)


def tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kwargs)
    return build


def tv_det(name: str, size: Optional[int] = None) -> Callable[[], nn.Module]:
    """A detector; ``size`` its transform's min/max size (SSD builders fix their own)."""
    return tv(name, weights_backbone=None, num_classes=11, **({"min_size": size, "max_size": size} if size else {}))


def tv_seg(name: str) -> Callable[[], nn.Module]:
    return tv(name, weights_backbone=None, num_classes=5)


def tm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return build


def timm_deploy_form(model: nn.Module) -> nn.Module:
    """RepVGG/MobileOne as timm deploys them: their own branches folded into one conv per block."""
    from timm.utils.model import reparameterize_model
    return reparameterize_model(model)


_YOLO_CONFIG: List[str] = []


def yolo(config: str) -> Callable[[], nn.Module]:
    """Ultralytics' DetectionModel built from its YAML (random weights; nothing downloaded), with its
    settings file in a temporary directory rather than the user's."""
    def build() -> nn.Module:
        if not _YOLO_CONFIG:  # under pytest, tests/conftest.py has set both already
            _YOLO_CONFIG.append(os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="irep-yolo-")))
            os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics import YOLO
        return YOLO(config).model
    return build


def _cls(name: str, source: str, build: Callable[[], nn.Module], size: int = 64, **kw: Any) -> Entry:
    return Entry(name, source, build, (2, 3, size, size), **kw)


ENTRIES: Tuple[Entry, ...] = (
    # torchvision classification
    _cls("resnet18", "torchvision", tv("resnet18", num_classes=10)),
    _cls("mobilenet_v3_small", "torchvision", tv("mobilenet_v3_small", num_classes=10)),
    _cls("efficientnet_b0", "torchvision", tv("efficientnet_b0", num_classes=10)),
    _cls("regnet_y_400mf", "torchvision", tv("regnet_y_400mf", num_classes=10)),
    _cls("densenet121", "torchvision", tv("densenet121", num_classes=10), slow=True),
    _cls("googlenet", "torchvision", tv("googlenet", num_classes=10, aux_logits=False, init_weights=True)),
    _cls("shufflenet_v2_x0_5", "torchvision", tv("shufflenet_v2_x0_5", num_classes=10)),
    # 224 px: its adaptive pool to 7x7 exports to ONNX only from a multiple of 7
    Entry("vgg11_bn", "torchvision", tv("vgg11_bn", num_classes=10), (1, 3, 224, 224), slow=True),
    _cls("squeezenet1_0", "torchvision", tv("squeezenet1_0", num_classes=10)),
    # torchvision detection: backbone features and raw head outputs
    Entry("fasterrcnn_mobilenet_v3_large_fpn", "torchvision", tv_det("fasterrcnn_mobilenet_v3_large_fpn", 160),
          (2, 3, 160, 160), probe=DetectorProbe, slow=True),
    Entry("retinanet_resnet50_fpn", "torchvision", tv_det("retinanet_resnet50_fpn", 128), (2, 3, 128, 128),
          probe=DetectorProbe, slow=True),
    Entry("fcos_resnet50_fpn", "torchvision", tv_det("fcos_resnet50_fpn", 128), (2, 3, 128, 128),
          probe=DetectorProbe, slow=True),
    Entry("ssd300_vgg16", "torchvision", tv_det("ssd300_vgg16"), (2, 3, 300, 300), probe=DetectorProbe,
          slow=True),
    Entry("ssdlite320_mobilenet_v3_large", "torchvision", tv_det("ssdlite320_mobilenet_v3_large"),
          (2, 3, 160, 160), probe=DetectorProbe, slow=True),
    # torchvision segmentation: "out" and "aux"
    _cls("fcn_resnet50", "torchvision", tv_seg("fcn_resnet50"), slow=True),
    _cls("deeplabv3_mobilenet_v3_large", "torchvision", tv_seg("deeplabv3_mobilenet_v3_large"), slow=True),
    _cls("lraspp_mobilenet_v3_large", "torchvision", tv_seg("lraspp_mobilenet_v3_large")),
    # timm: six norm-act families (BatchNormAct2d), plain ResNets, RepVGG/MobileOne, and a ViT without 3x3 convs
    _cls("timm_resnetv2_18", "timm", tm("resnetv2_18")),
    _cls("timm_regnety_002", "timm", tm("regnety_002")),
    _cls("timm_efficientnet_b0", "timm", tm("efficientnet_b0")),
    _cls("timm_mobilenetv3_large_100", "timm", tm("mobilenetv3_large_100")),
    _cls("timm_cspresnet50", "timm", tm("cspresnet50"), slow=True),
    _cls("timm_ghostnet_100", "timm", tm("ghostnet_100")),
    _cls("timm_resnet18", "timm", tm("resnet18")),
    _cls("timm_resnet50d", "timm", tm("resnet50d"), slow=True),
    _cls("timm_repvgg_a0", "timm", tm("repvgg_a0"), plain=timm_deploy_form),
    _cls("timm_mobileone_s0", "timm", tm("mobileone_s0"), plain=timm_deploy_form),
    _cls("timm_vit_tiny_patch16", "timm", tm("vit_tiny_patch16_224", img_size=64), expected="refused",
         refusal=("patch_embed.proj", "kernel 16x16, not 3x3")),
    # Ultralytics: the DetectionModel in eval mode
    _cls("yolov8n", "ultralytics", yolo("yolov8n.yaml")),
    _cls("yolo11n", "ultralytics", yolo("yolo11n.yaml")),
    # custom modules
    _cls("custom_tied_weights", "custom", TiedWeights, size=16, must_rewrite=("stem", "tail"),
         must_skip=("a", "b", "c")),
    _cls("custom_partly_untraceable", "custom", PartlyUntraceable, size=16, must_rewrite=("stem", "tail.0")),
)
BY_NAME: Dict[str, Entry] = {e.name: e for e in ENTRIES}


# -- the check -------------------------------------------------------------------------------------------
SKIP_KINDS = (  # (kind, pattern of irepify's reason), first match wins
    ("not 3x3", r"^kernel "), ("dilation", r"^dilation"), ("padding", r"^padding \("), ("padding mode", r"padding mode"),
    ("stride", r"^stride"), ("conv subclass", r"^a \w+ \(only plain"), ("include/exclude", r"matched by"),
    ("shared weight", r"shar|tied"), ("called more than once", r"called \d+ times"),
    ("untraceable", r"cannot be traced"), ("not reached", r"not reached"),
)


def skip_kind(reason: str) -> str:
    for kind, pattern in SKIP_KINDS:
        if re.search(pattern, reason):
            return kind
    return "other"


@dataclass
class Result:
    name: str
    source: str
    expected: str
    status: str = "failed"  # "exact", "refused" or "failed"
    failures: List[str] = field(default_factory=list)
    message: str = ""  # the IrepError of a refusal
    eligible: int = 0  # convs irepify's geometry rule accepts (3x3, padding 1, ...)
    blocks: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)  # skip kind -> count
    skip_examples: Dict[str, str] = field(default_factory=dict)  # skip kind -> "path: reason" (the first)
    branches: int = 0
    start_error: Optional[float] = None
    branch_effect: Optional[float] = None
    fused_error: Optional[float] = None
    onnx_original: Dict[str, int] = field(default_factory=dict)
    onnx_fused: Dict[str, int] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)  # irepify, fuse_model (one run)
    floor: Optional[Tuple[float, float]] = None  # fused error above TOL: (multi-branch, fused) vs float64

    @property
    def passed(self) -> bool:
        return self.status == self.expected and not self.failures

    def line(self) -> str:
        """One line: the outcome, and the first failure."""
        text = "{} ({}): {}".format(self.name, self.source, self.status)
        return text + (": " + "; ".join(self.failures) if self.failures else "")


def outputs(probe: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad(), exact_fp32():
        return list(probe(x))


def max_error(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> float:
    """The largest relative error (``compare``'s measure) over the output tensors."""
    if len(reference) != len(candidate):
        raise ValueError("{} output tensors, expected {}".format(len(candidate), len(reference)))
    return max(compare(a, b).rel_error for a, b in zip(reference, candidate))


def onnx_ops(probe: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Op counts of ``probe`` exported as the project exports (legacy exporter, eval mode)."""
    import onnx
    from irep_deploy.engines.onnx import _legacy_export_kwargs
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(probe.eval(), (x,), buffer, opset_version=OPSET, do_constant_folding=True,
                          **_legacy_export_kwargs())
    nodes = onnx.load_from_string(buffer.getvalue()).graph.node
    return dict(Counter(n.op_type for n in nodes if n.op_type not in NO_OPS))


def calibrate(model: nn.Module, probe: nn.Module, batch: torch.Tensor) -> nn.Module:
    """Every BatchNorm's running mean set to that of ``batch`` (one train-mode forward of ``probe`` with
    momentum None); the running variances stay as they were (random in [0.5, 2], ``randomize_bn``).

    Both halves matter for a meaningful 1e-5 check on a random network: with random means some
    channels sit far off zero and die, so that mobilenet_v3_small's logits do not depend on its input
    at all (nothing a wrong fusion did would show); with the batch's own variances, near zero in a
    few channels, the random networks amplify float32 rounding by themselves to 1e-5..1e-4 (measured
    against float64, original network alone), so a correct fusion would fail."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.running_var.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one batch's statistics
    with torch.no_grad():
        probe.train()(batch)
        for m, (momentum, var) in zip(norms, saved):
            m.momentum = momentum
            m.running_var.copy_(var)
    return model.eval()


def calibration_batch(entry: Entry, seed: int) -> torch.Tensor:
    return torch.randn(*entry.shape, generator=torch.Generator().manual_seed(seed + 1))


def build_original(entry: Entry, seed: int = SEED) -> nn.Module:
    """The network as its library builds it (random weights), its BatchNorms given random affine
    parameters and variances and calibrated means (:func:`calibrate`), in eval mode."""
    torch.manual_seed(seed)
    model = randomize_bn(entry.build(), seed=seed)
    return calibrate(model, entry.probe(model), calibration_batch(entry, seed))


def make_branches(net: nn.Module, entry: Entry, seed: int) -> int:
    """A random code at 2/3 of the capacity, its branches created and made non-zero (random BN affine
    parameters and alpha/beta), every BN calibrated again; returns the code's branch count."""
    code = ArchCode.random(net.irep_config["backbone"], seed=seed, ops=net.irep_config["ops"])
    apply_arch(net, code, create=True)
    for i, block in enumerate(m for m in net.modules() if isinstance(m, IrepConv)):
        randomize_bn(block.branches, seed=seed + i)
    randomize_arch_params(net, seed=seed)
    calibrate(net, entry.probe(net), calibration_batch(entry, seed))
    return code.count()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return "{}: {}".format(type(exc).__name__, text[0][:300] if text else "")


def check_network(entry: Entry, seed: int = SEED) -> Result:
    """Put one entry through irepify -> random code -> fuse_model -> ONNX; every check that fails
    adds a line to ``result.failures`` (a crash ends the check there, naming the stage)."""
    result = Result(entry.name, entry.source, entry.expected)
    stage = "build"
    try:
        original = build_original(entry, seed)
        x = torch.randn(*entry.shape, generator=torch.Generator().manual_seed(seed))
        result.eligible = sum(isinstance(m, nn.Conv2d) and ineligible_reason(m) is None for m in original.modules())
        want = outputs(entry.probe(original), x)
        stage = "irepify"
        t0 = time.perf_counter()
        try:
            net = irepify(original, name="matrix:" + entry.name, input_size=entry.shape[-1])
        except IrepError as exc:
            result.status, result.message = "refused", str(exc)
            missing = [s for s in entry.refusal if s not in result.message]
            if entry.expected == "refused" and missing:
                result.failures.append("the refusal does not name {}: {}".format(missing, result.message))
            elif entry.expected != "refused":
                result.failures.append("refused: " + result.message)
            return result
        result.seconds["irepify"] = time.perf_counter() - t0
        _report(net, entry, result)
        if entry.expected == "refused":
            result.failures.append("expected a refusal naming {}, but irepify rewrote {} conv(s)".format(
                entry.refusal, result.blocks))
        net.eval()
        stage = "start"
        result.start_error = _within_tol(result, "start: irepified differs from the original",
                                         max_error(want, outputs(entry.probe(net), x)))
        stage = "apply_arch"
        result.branches = make_branches(net, entry, seed)
        multi = outputs(entry.probe(net), x)
        result.branch_effect = max_error(want, multi)
        if not result.branches or not result.branch_effect > BRANCH_EFFECT:
            result.failures.append("the code's {} branches change the output by only {:.3g} (relative)".format(
                result.branches, result.branch_effect))
        stage = "fuse_model"
        # the float64 reference of check 3 is this network as it is now, whatever fuse_model does to it
        before = copy.deepcopy(net)
        t0 = time.perf_counter()
        fused = fuse_model(net)
        result.seconds["fuse_model"] = time.perf_counter() - t0
        left = [n for n, m in fused.named_modules() if isinstance(m, IrepConv)]
        if left:
            result.failures.append("fused: {} IrepConv(s) left, first {}".format(len(left), left[0]))
        stage = "fused forward"
        got = outputs(entry.probe(fused), x)
        result.fused_error = _within_tol(result, "fused differs from multi-branch", max_error(multi, got))
        if result.failures and result.fused_error > TOL:  # is it float32 rounding? ask float64
            exact = outputs(entry.probe(before.double()), x.double())
            result.floor = (max_error(exact, multi), max_error(exact, got))
            if result.floor[0] > FLOOR_MIN and result.floor[1] <= FLOOR_RATIO * result.floor[0]:
                result.failures.pop()  # rounding of float32, by float64's verdict
            else:
                result.failures[-1] += " (against float64 the multi-branch network is off by {:.3g}, fused by " \
                                       "{:.3g})".format(*result.floor)
        stage = "onnx export"
        result.onnx_original = onnx_ops(entry.probe(entry.plain(original) if entry.plain else original), x)
        result.onnx_fused = onnx_ops(entry.probe(fused), x)
        if result.onnx_fused != result.onnx_original:
            diff = {op: (result.onnx_original.get(op, 0), result.onnx_fused.get(op, 0))
                    for op in sorted(set(result.onnx_original) | set(result.onnx_fused))
                    if result.onnx_original.get(op, 0) != result.onnx_fused.get(op, 0)}
            result.failures.append("fused ONNX ops differ from the plain original's (op: original, fused): {}".format(
                ", ".join("{} {}->{}".format(op, a, b) for op, (a, b) in diff.items())))
    except Exception as exc:  # any crash is the entry's result, named by its stage
        result.failures.append("{} crashed: {}".format(stage, _first_line(exc)))
        result.message = traceback.format_exc(limit=-3)[-2000:]  # an exporter's error holds its whole graph
        return result
    if not result.failures:
        result.status = "exact"
    return result


def _within_tol(result: Result, what: str, error: float) -> float:
    """``error``; above :data:`TOL` (or NaN) it is also a failure, ``what`` saying what differs."""
    if not error <= TOL:
        result.failures.append("{} by {:.3g} (relative) > {:g}".format(what, error, TOL))
    return error


def _report(net: nn.Module, entry: Entry, result: Result) -> None:
    report = net.irep_report
    result.blocks = len(report.rewritten)
    for path, reason in report.skipped:
        kind = skip_kind(reason)
        result.skipped[kind] = result.skipped.get(kind, 0) + 1
        result.skip_examples.setdefault(kind, "{}: {}".format(path, reason))
    missing = [p for p in entry.must_rewrite if p not in report.rewritten]
    if missing:
        result.failures.append("not rewritten: {} ({})".format(", ".join(missing), "; ".join(
            "{}: {}".format(p, r) for p, r in report.skipped if p in missing) or "not in the report"))
    skipped = dict(report.skipped)
    unskipped = [p for p in entry.must_skip if not skipped.get(p)]
    if unskipped:
        result.failures.append("expected left out with a reason, but {}: {}".format(
            "rewritten" if all(p in report.rewritten for p in unskipped) else "not reported", ", ".join(unskipped)))


def select(names: Sequence[str] = (), include_slow: bool = True) -> List[Entry]:
    """Entries by name (all when none is given); unknown names raise KeyError naming them."""
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise KeyError("unknown network(s): {} (known: {})".format(", ".join(unknown), ", ".join(BY_NAME)))
    chosen = [BY_NAME[n] for n in names] if names else list(ENTRIES)
    return [e for e in chosen if include_slow or not e.slow]
