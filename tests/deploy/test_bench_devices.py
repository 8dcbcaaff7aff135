"""Device detection parsers on real-format text, and the refusal of the wrong device."""
from __future__ import annotations

import pytest

from irep_deploy.bench import devices
from irep_deploy.bench.devices import DeviceInfo, DeviceMismatchError

XAVIER_RELEASE = ("# R35 (release), REVISION: 3.1, GCID: 32827747, BOARD: t186ref, EABI: aarch64, "
                  "DATE: Sun Mar 19 15:19:21 UTC 2023\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n")
ORIN_RELEASE = ("# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, "
                "DATE: Fri Jul 19 23:24:25 UTC 2024\n")


def test_tegra_release():
    assert devices.parse_tegra_release(XAVIER_RELEASE) == {
        "release": "R35.3.1", "major": 35, "revision": "3.1", "board": "t186ref"}
    assert devices.parse_tegra_release(ORIN_RELEASE)["release"] == "R36.3.0"
    assert devices.parse_tegra_release("Ubuntu 22.04") is None


@pytest.mark.parametrize("raw, kind", [
    ("NVIDIA Jetson AGX Xavier Developer Kit\x00", "xavier"),
    ("NVIDIA Jetson AGX Orin Developer Kit\x00", "orin"),
    ("NVIDIA Jetson Xavier NX Developer Kit\x00", "xavier"),
    ("Jetson-AGX\x00", "jetson"),
    ("QEMU Virtual Machine\x00", None),
    ("", None),
])
def test_device_tree_model(raw, kind):
    assert devices.jetson_kind(devices.parse_device_tree_model(raw)) == kind


def test_compatible_names_the_soc():
    assert devices.parse_compatible("nvidia,p2972-0000\x00nvidia,galen\x00nvidia,tegra194\x00") == "xavier"
    assert devices.parse_compatible("nvidia,p3737-0000+p3701-0000\x00nvidia,tegra234\x00") == "orin"
    assert devices.parse_compatible("raspberrypi,4-model-b\x00brcm,bcm2711\x00") is None


def test_nvpmodel_and_clocks():
    assert devices.parse_nvpmodel("NV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert devices.parse_nvpmodel("NV Power Mode: MODE_30W_ALL\n3\n") == {"name": "MODE_30W_ALL", "id": 3}
    assert devices.parse_nvpmodel("nvpmodel: command not found") is None
    assert devices.clocks_locked("1377000000\n", "1377000000\n") is True
    assert devices.clocks_locked("114750000\n", "1377000000\n") is False
    assert devices.clocks_locked("", "1") is None


def test_nvidia_smi():
    assert devices.parse_nvidia_smi("NVIDIA A100-SXM4-80GB, 535.129.03\n") == {
        "name": "NVIDIA A100-SXM4-80GB", "driver": "535.129.03"}
    assert devices.parse_nvidia_smi("") is None


def test_wrong_device_is_refused_unless_forced():
    desktop = DeviceInfo("gpu", "NVIDIA GeForce RTX 3090", True)
    with pytest.raises(DeviceMismatchError, match="--device xavier was asked for.*--force"):
        devices.resolve("xavier", info=desktop)
    forced = devices.resolve("xavier", force=True, info=DeviceInfo("gpu", "NVIDIA GeForce RTX 3090", True))
    assert any("--force" in n for n in forced.notes)
    a100 = DeviceInfo("a100", "NVIDIA A100-SXM4-80GB", True)
    assert devices.resolve("a100", info=a100) is a100
    assert devices.resolve("cpu", info=a100).cuda is False
    with pytest.raises(Exception, match="unknown device"):
        devices.resolve("tpu", info=a100)


def test_environment_record_has_the_versions():
    env = devices.environment()
    for key in ("torch", "cuda", "onnxruntime", "tensorrt", "gpu", "driver", "cpu", "python"):
        assert key in env
    assert env["device"]["kind"] in ("cpu", "gpu", "xavier", "orin", "a100", "h100", "jetson")
