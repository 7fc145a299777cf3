"""kda_ext build checks: the CUDA sources compile for sm_90a even where only the CPU build runs."""
import os
import subprocess
import sys

import pytest

import kda_ext._build_config as build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from check_cuda_compile import find_nvcc  # noqa: E402


@pytest.mark.skipif(build_config.WITH_CUDA, reason="this build compiled the CUDA sources itself")
@pytest.mark.skipif(find_nvcc() is None, reason="no nvcc on this machine")
def test_cuda_sources_compile():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "check_cuda_compile.py")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
