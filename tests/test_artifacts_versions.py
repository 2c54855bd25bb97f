"""versions() names the CPU kernel path: autoround weights differ across kernel paths (issue #14)."""

import os
import subprocess
import sys

import torch

from pascal_moe.io.artifacts import versions


def test_versions_records_the_cpu_kernel_path() -> None:
    assert versions()["cpu"].split()[0] == torch.backends.cpu.get_cpu_capability()


def test_cpu_kind_follows_the_dispatch_override() -> None:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run(
        [sys.executable, "-c", "from pascal_moe.io.artifacts import cpu_kind; print(cpu_kind())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split()[0] == "DEFAULT"
