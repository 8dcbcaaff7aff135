"""Architecture codes: constructors, budgets, the text format and every rejection of the reader."""
from __future__ import annotations

import pytest

from irep_deploy import ArchCode
from irep_deploy.arch import budget_count
from irep_deploy.errors import ArchFormatError
from irep_deploy.ops import SPACES


def test_constructors_and_budget_helpers():
    full = ArchCode.full("resnet18")
    assert full.ops == SPACES["resnet_imagenet"] and len(full.layers) == 16
    assert full.count() == full.capacity() == 16 * 7 and full.ratio() == 1.0
    assert ArchCode.empty("resnet18").count() == 0
    code = ArchCode.random("resnet18", ratio=2 / 3, seed=0)
    assert code.count() == code.budget(2 / 3) == budget_count(112, 2 / 3) == 74
    assert code == ArchCode.random("resnet18", ratio=2 / 3, seed=0)
    assert code != ArchCode.random("resnet18", ratio=2 / 3, seed=1)
    assert sum(code.op_counts().values()) == sum(code.layer_counts().values()) == 74
    assert ArchCode.random("resnet18", count=5, seed=2).count() == 5
    with pytest.raises(ValueError):
        budget_count(10, 1.5)


def test_identity_is_never_placed_where_unavailable():
    full = ArchCode.full("vgg16")  # identity needs stride 1 and in == out
    identity = full.ops.index("identity")
    with_identity = {name for name, row in zip(full.layers, full.bits) if row[identity]}
    assert "features.0" not in with_identity and "features.5" not in with_identity
    assert "features.2" in with_identity
    assert full.capacity() == 13 * 9 - 4  # 3->64, 64->128, 128->256, 256->512 change channels
    for seed in range(5):
        code = ArchCode.random("vgg16", ratio=0.9, seed=seed)
        assert not any(code.bits[full.layers.index(n)][identity] for n in ("features.0", "features.5"))


def test_round_trip_through_a_file(tmp_path):
    code = ArchCode.random("resnet50", ratio=0.5, seed=4)
    path = tmp_path / "arch.bin"
    code.save(path)
    text = path.read_text()
    assert text.startswith("# irep-deploy architecture code\nversion: 1\nbackbone: resnet50\nops: conv1x3 ")
    assert ArchCode.load(path) == code
    assert "layer1.0.conv2 " in text


def lines_of(code: ArchCode):
    return code.dumps().splitlines()


def write(tmp_path, lines):
    path = tmp_path / "arch.bin"
    path.write_text("\n".join(lines) + "\n")
    return path


BASE = ArchCode.full("resnet18_cifar")
ROW1 = 5  # header comment, version, backbone, ops, then the first row (line 5)


@pytest.mark.parametrize("edit, message", [
    (lambda L: L[:1] + ["colour: blue"] + L[1:], r":2: unknown key 'colour'"),
    (lambda L: [l.replace("dil1x2", "dil3x3") if l.startswith("ops:") else l for l in L], r":4: unknown op 'dil3x3'"),
    (lambda L: L[:ROW1 - 1] + [L[ROW1 - 1] + "1"] + L[ROW1:], r":5: 9 bits for 8 ops"),
    (lambda L: L[:ROW1 - 1] + [L[ROW1 - 1][:-1] + "2"] + L[ROW1:], r":5: bits may only be 0 or 1"),
    (lambda L: L[:-1], r":21: missing rows: resnet18_cifar has 17 searchable layers, the file gives 16 \(first missing: layer4.1.conv2\)"),
    (lambda L: L + ["layer5.0.conv1 11111111"], r":22: extra row 'layer5.0.conv1'"),
    (lambda L: L + [L[ROW1]], r":22: layer layer1.0.conv1 given twice \(first on line 6\)"),
    (lambda L: L[:ROW1] + [L[ROW1 + 1], L[ROW1]] + L[ROW1 + 2:], r":6: layer layer1.0.conv2 is out of order"),
    (lambda L: L[:ROW1] + ["layer1.0.conv9 00000000"] + L[ROW1 + 1:], r":6: .*not a searchable layer"),
    (lambda L: [l.replace("resnet18_cifar", "resnet19") for l in L], r":3: unknown backbone 'resnet19'"),
    (lambda L: [l.replace("version: 1", "version: 3") for l in L], r":2: unsupported version '3'"),
    (lambda L: [l for l in L if not l.startswith("ops:")], r":4: missing 'ops:' line"),
    (lambda L: L[:ROW1] + ["nonsense"] + L[ROW1:], r":6: expected '<layer> <bits>'"),
    (lambda L: L[:3] + L[4:ROW1 + 1] + [L[3]] + L[ROW1 + 1:], r":6: key 'ops' after the first layer row"),
])
def test_reader_rejects_with_file_and_line(tmp_path, edit, message):
    path = write(tmp_path, edit(lines_of(BASE)))
    with pytest.raises(ArchFormatError, match=str(path).replace(".", r"\.") + message):
        ArchCode.load(path)


def test_reader_rejects_identity_at_stride_2(tmp_path):
    ops = ["conv1x3", "identity"]
    code = ArchCode.empty("resnet18", ops=ops)
    lines = lines_of(code)
    row = code.layers.index("layer2.0.conv1")  # the downsampling conv of stage 2
    lines[4 + row] = "layer2.0.conv1 01"
    with pytest.raises(ArchFormatError, match=r":{}: op identity is unavailable at layer2.0.conv1".format(5 + row)):
        ArchCode.load(write(tmp_path, lines))


def test_reader_rejects_files_that_are_not_codes(tmp_path):
    with pytest.raises(ArchFormatError, match="no such file"):
        ArchCode.load(tmp_path / "missing.bin")
    with pytest.raises(ArchFormatError, match="is a directory"):
        ArchCode.load(tmp_path)
    blob = tmp_path / "ckpt.pt"
    blob.write_bytes(b"PK\x03\x04\xff\xfe\x00binary")
    with pytest.raises(ArchFormatError, match="not UTF-8"):
        ArchCode.load(blob)


def test_format_table_marks_unavailable_slots():
    table = ArchCode.random("vgg16_cifar", seed=0).format_table()
    first = table.splitlines()[1]
    assert first.startswith("features.0") and first.split()[-2] == "-"  # identity unavailable at the stem
    assert "budget C at 2/3 = 75" in table  # floor(113 * 2 / 3)


def test_an_unknown_backbone_lists_the_built_in_names_only(monkeypatch):
    """Networks registered from model specs in this process are not listed: the line stays bounded."""
    from irep_deploy import arch

    known = arch.known_backbones()
    monkeypatch.setattr(arch, "BACKBONES", dict(known))
    arch.register_backbone("spec:registered-here", known["resnet18_cifar"].layers, "resnet_cifar", builtin=False)
    with pytest.raises(ArchFormatError) as err:
        ArchCode.loads("version: 1\nbackbone: resnet19\n")
    message = str(err.value)
    assert "unknown backbone 'resnet19' (built in: " in message and "resnet18_cifar" in message
    assert "spec:registered-here" not in message
