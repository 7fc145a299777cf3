"""kda_ext build checks: the build's record matches what was compiled, the version has one source,
setup.py's CUDA decision and CUTLASS lookup, and `python -m kda_ext`.

(That the CUDA sources compile for sm_90a where only the CPU build runs is checked by
scripts/check_cuda_compile.py, a step of its own in .ci/run.)
"""
import ast
import os
import re
import subprocess
import sys

import pytest
import torch

import kda_ext
import kda_ext._build_config as build_config
from kda_ext import _build_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from check_cuda_compile import load_setup  # noqa: E402

setup_py = load_setup()


def complete_probe(**changes):
    fields = dict(torch_version="2.11.0+cu130", torch_cuda="13.0", cuda_home="/opt/cuda",
                  cuda_home_from_env=True, nvcc_path="/opt/cuda/bin/nvcc", nvcc_version="13.0",
                  cudart_dir="/opt/cuda/lib64", has_cudart=True, has_runtime_header=True)
    fields.update(changes)
    return setup_py.CudaProbe(**fields)


def test_build_config_matches_the_compiled_extension():
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("kda_ext::chunk_kda_fwd", "CUDA")
    assert build_config.WITH_CUDA == has_cuda_kernel
    assert torch._C._dispatch_has_kernel_for_dispatch_key("kda_ext::chunk_kda_fwd", "CPU")
    assert build_config.TORCH_VERSION == torch.__version__
    assert build_config.CUDA_REASON, "the build must say why CUDA is on or off"
    if build_config.WITH_SM90:
        assert build_config.WITH_CUDA and "90a" in build_config.CUDA_ARCHS.split(";")


def test_version_has_one_source():
    from setuptools.config.pyprojecttoml import read_configuration

    from kda_ext._version import __version__

    project = read_configuration(os.path.join(ROOT, "pyproject.toml"))["project"]
    assert project["version"] == __version__ == kda_ext.__version__
    assert "version" in project["dynamic"]
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    setup_calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and getattr(node.func, "id", None) == "setup"]
    assert len(setup_calls) == 1
    assert "version" not in [kw.arg for kw in setup_calls[0].keywords], "setup.py must not restate the version"


def test_isolated_builds_use_the_torch_the_project_tests_with():
    # The wheel requires the torch it was built against; pyproject.toml pins the build's torch to
    # the release scripts/setup_env.sh installs, so both environments agree.
    from setuptools.config.pyprojecttoml import load_file

    requires = load_file(os.path.join(ROOT, "pyproject.toml"))["build-system"]["requires"]
    pins = [r for r in requires if re.match(r"torch\b", r)]
    assert len(pins) == 1 and pins[0].startswith("torch=="), pins
    with open(os.path.join(ROOT, "scripts", "setup_env.sh")) as f:
        default = re.search(r"KDA_EXT_TORCH_VERSION:-([0-9.]+)", f.read()).group(1)
    assert pins[0] == f"torch=={default}"
    assert "nvidia-cutlass==4.2.0.0" in requires and setup_py.CUTLASS_REQUIREMENT == "nvidia-cutlass==4.2.0.0"


def test_cuda_decision():
    assert setup_py.decide_cuda("auto", complete_probe())[0] is True
    assert setup_py.decide_cuda("1", complete_probe())[0] is True
    off, reason = setup_py.decide_cuda("0", None)
    assert off is False and "KDA_EXT_CUDA=0" in reason

    cases = {
        "not a CUDA build": complete_probe(torch_cuda=None, torch_version="2.13.0+cpu"),
        "no CUDA toolkit": complete_probe(cuda_home=None, nvcc_path=None, nvcc_version=None),
        "has no bin/nvcc": complete_probe(nvcc_path=None, nvcc_version=None),
        "major versions must match": complete_probe(torch_cuda="12.8"),
        "no libcudart.so in /opt/cuda/lib64": complete_probe(has_cudart=False),
        "no include/cuda_runtime.h": complete_probe(has_runtime_header=False),
    }
    for expected, probe in cases.items():
        with_cuda, reason = setup_py.decide_cuda("auto", probe)
        assert with_cuda is False and expected in reason and "KDA_EXT_CUDA=1" in reason, reason
        with pytest.raises(SystemExit, match=expected):
            setup_py.decide_cuda("1", probe)
    with pytest.raises(SystemExit, match="KDA_EXT_CUDA must be auto, 0 or 1"):
        setup_py.decide_cuda("yes", complete_probe())


def test_incomplete_toolkit_names_where_nvcc_really_runs_from():
    # nvcc on PATH as a wrapper: CUDA_HOME guessed two folders above it lacks the libraries.
    probe = complete_probe(cuda_home="/usr/local", cuda_home_from_env=False, cudart_dir="/usr/local/lib64",
                           has_cudart=False, nvcc_toolkit_root="/usr/local/cuda-13.0")
    _, reason = setup_py.decide_cuda("auto", probe)
    assert "guessed from nvcc on PATH" in reason and "CUDA_HOME=/usr/local/cuda-13.0" in reason, reason


def test_cutlass_headers_are_found_from_the_installed_package(monkeypatch):
    include = setup_py.find_cutlass_include()
    assert include is not None, "nvidia-cutlass is not installed (scripts/setup_env.sh installs it)"
    assert os.path.exists(os.path.join(include, "cute", "tensor.hpp"))
    assert os.path.exists(os.path.join(include, "cutlass", "pipeline", "pipeline.hpp"))
    assert setup_py.cutlass_version(include) == "4.2.0"
    monkeypatch.setattr(setup_py.importlib.util, "find_spec", lambda name: None)
    assert setup_py.find_cutlass_include() is None
    with pytest.raises(SystemExit, match=r"pip install nvidia-cutlass==4\.2\.0\.0"):
        setup_py.require_cutlass()


def test_kda_ext_cuda_1_fails_before_compiling(tmp_path):
    # CUDA_HOME pointing at an empty folder: no nvcc (and on this CPU torch, no CUDA build either).
    env = dict(os.environ, KDA_EXT_CUDA="1", CUDA_HOME=str(tmp_path / "no_toolkit"))
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "temp")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "KDA_EXT_CUDA=1 but the CUDA kernels cannot be built" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "temp").exists(), "it started compiling"


def test_build_ext_writes_the_config_into_build_lib_and_only_in_place_into_the_sources(tmp_path, monkeypatch):
    from setuptools import Distribution

    config = {"WITH_CUDA": False, "CUDA_REASON": "test", "CUDA_ARCHS": "", "WITH_SM90": False}
    source_root = tmp_path / "checkout"
    (source_root / "kda_ext").mkdir(parents=True)
    monkeypatch.setattr(setup_py, "ROOT", str(source_root))
    for inplace in (False, True):
        dist = Distribution({"name": "kda_ext", "ext_modules": [], "cmdclass": setup_py._cmdclass(config)})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib = str(tmp_path / f"lib{int(inplace)}")
        cmd.inplace = inplace
        cmd.ensure_finalized()
        cmd.run()
        written = tmp_path / f"lib{int(inplace)}" / "kda_ext" / "_build_config.py"
        namespace = {}
        exec(written.read_text(), namespace)
        assert namespace["CUDA_REASON"] == "test" and namespace["WITH_CUDA"] is False
        assert (source_root / "kda_ext" / "_build_config.py").exists() == inplace


def test_arch_runs_on():
    assert _build_info.arch_runs_on("90a", (9, 0))
    assert not _build_info.arch_runs_on("90a", (10, 0))
    assert _build_info.arch_runs_on("80", (8, 6))
    assert not _build_info.arch_runs_on("80", (9, 0))
    assert not _build_info.arch_runs_on("86", (8, 0))


def test_kernel_paths():
    hopper = {"name": "H100", "capability": (9, 0)}
    ampere = {"name": "A100", "capability": (8, 0)}
    cuda = {"WITH_CUDA": True, "CUDA_REASON": "auto", "CUDA_ARCHS": "90a", "WITH_SM90": False}
    paths = _build_info._kernel_paths(cuda, hopper)
    assert paths["cpu"][0] and paths["cuda"][0]
    assert not paths["sm90"][0] and "no sm90 sources" in paths["sm90"][1]
    paths = _build_info._kernel_paths(cuda, ampere)
    assert not paths["cuda"][0] and "does not run on A100" in paths["cuda"][1]
    assert not _build_info._kernel_paths(cuda, None)["cuda"][0]
    sm90 = dict(cuda, WITH_SM90=True)
    assert _build_info._kernel_paths(sm90, hopper)["sm90"][0]
    assert not _build_info._kernel_paths(sm90, ampere)["sm90"][0]
    no_90a = dict(cuda, CUDA_ARCHS="80")
    assert "90a is not in KDA_EXT_CUDA_ARCHS" in _build_info._kernel_paths(no_90a, ampere)["sm90"][1]
    cpu = {"WITH_CUDA": False, "CUDA_REASON": "KDA_EXT_CUDA=0", "CUDA_ARCHS": "", "WITH_SM90": False}
    paths = _build_info._kernel_paths(cpu, hopper)
    assert paths["cpu"][0] and not paths["cuda"][0] and "KDA_EXT_CUDA=0" in paths["cuda"][1]
    assert not paths["sm90"][0]


def test_a_c_extension_that_does_not_load_says_why(monkeypatch):
    error = ImportError("undefined symbol: _ZN3c10")
    monkeypatch.setattr(kda_ext, "load_build_config", lambda: {"TORCH_VERSION": "0.0.1"})
    message = kda_ext._explain_load_failure(error)
    assert "built against torch 0.0.1" in message and torch.__version__ in message
    assert "--no-build-isolation" in message
    monkeypatch.setattr(kda_ext, "load_build_config", lambda: None)
    assert "pip install ." in kda_ext._explain_load_failure(error)


def test_python_m_kda_ext_prints_the_build_and_the_kernel_paths(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "kda_ext"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert f"kda_ext {kda_ext.__version__}" in out
    assert ("build:   CUDA" if build_config.WITH_CUDA else "build:   CPU-only") in out
    assert build_config.CUDA_REASON in out
    assert f"built against torch {build_config.TORCH_VERSION}" in out
    assert "device:" in out
    for label in ("cpu ", "cuda portable ", "cuda sm90 "):
        assert f"\n  {label}" in out, out
    info = kda_ext.build_info()
    assert info["version"] == kda_ext.__version__ and info["build"]["WITH_CUDA"] == build_config.WITH_CUDA
