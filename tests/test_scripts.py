# tests/test_scripts.py: the README's main job (scripts/demo.py) runs from any working directory.
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_and_passes_on_cpu(tmp_path):
    # Started outside the checkout, as `bash scripts/demo.sh` effectively does: kda_ext must be
    # found from the script's location, and the demo's own check must pass.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASS" in proc.stdout and "forward+backward" in proc.stdout, proc.stdout[-2000:]


def test_shell_scripts_parse():
    # device_check.sh only ever runs on a leased GPU machine: a syntax error must show up here.
    names = ("device_check.sh", "device_ab.sh", "device_targets.sh", "setup_env.sh", "test.sh", "demo.sh",
             "build_flashkda.sh", "fla_upstream_tests.sh", "dev/prebuild_for_device.sh",
             "dev/fused_profile.sh")
    for path in [os.path.join(ROOT, "scripts", name) for name in names] + [os.path.join(ROOT, ".ci", "run")]:
        proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


def test_ptx_load_report_flags_loads_that_wait_one_at_a_time():
    # scripts/dev/ptx_load_report.py guides the kernels' load work without a GPU: a load alone in a
    # branch block that also converts it must count, loads issued together must not.
    sys.path.insert(0, os.path.join(ROOT, "scripts", "dev"))
    import ptx_load_report

    ptx = """
.visible .entry _Z6kernelv(
)
{
\tsetp.ge.s32 \t%p1, %r1, %r2;
\t@%p1 bra \t$L__BB0_2;
\tld.global.u16 \t%rs1, [%rd1];
\tcvt.f32.bf16 \t%f1, %rs1;
$L__BB0_2:
\tld.global.u16 \t%rs2, [%rd2];
\tld.global.u16 \t%rs3, [%rd3];
\tld.global.u16 \t%rs4, [%rd4];
\tcvt.f32.bf16 \t%f2, %rs2;
\tcvt.f32.bf16 \t%f3, %rs3;
\tcvt.f32.bf16 \t%f4, %rs4;
$L__BB0_3:
\tld.global.u16 \t%rs5, [%rd5];
\tst.shared.u16 \t[%r9], %rs6;
\tret;
}
"""
    assert ptx_load_report.kernel_report(ptx, []) == [("_Z6kernelv", 5, 1)]
    assert ptx_load_report.kernel_report(ptx, ["other"]) == []

    # --where: the flagged load is attributed to the source line of the .loc in force before it.
    ptx_lines = ptx.replace("\tld.global.u16 \t%rs1", "\t.loc\t3 177 9\n\tld.global.u16 \t%rs1")
    ptx_lines = '.file\t3 "/src/csrc/cuda/bwd_common.cuh"\n' + ptx_lines.replace(
        "\tld.global.u16 \t%rs2", "\t.loc\t3 210 5\n\tld.global.u16 \t%rs2")
    where = {}
    assert ptx_load_report.kernel_report(ptx_lines, [], where) == [("_Z6kernelv", 5, 1)]
    assert where == {"_Z6kernelv": {(3, 177): 1}}
    assert ptx_load_report.ptx_files(ptx_lines) == {3: "/src/csrc/cuda/bwd_common.cuh"}


def test_ncu_stalls_summarises_a_saved_report():
    # scripts/dev/ncu_stalls.py turns ncu's --csv metrics into one line per launch; its parser runs here
    # on a report in ncu's own format (the profiling itself needs a GPU).
    sys.path.insert(0, os.path.join(ROOT, "scripts", "dev"))
    import ncu_stalls

    head = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",' \
           '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
    kern = '"3","1","python3","h","void kda_ext::cuda::k<float>(P)","1","7","(256, 1, 1)","(4, 1, 1)","0","9.0","m",'
    rows = [("gpu__time_duration.sum", "ns", "2,500,000"), ("launch__grid_size", "", "4"),
            ("launch__block_size", "", "256"), ("smsp__inst_executed.sum", "inst", "3,200"),
            ("launch__registers_per_thread", "", "96"),
            ("smsp__issue_active.avg.pct_of_peak_sustained_active", "%", "40.5"),
            ("smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "", "3.5"),
            ("smsp__average_warps_issue_stalled_wait_per_issue_active.ratio", "", "1.5"),
            ("smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "", "0.25")]
    text = "==PROF== noise\n" + head + "\n" + "\n".join(kern + f'"{n}","{u}","{v}"' for n, u, v in rows)
    table = ncu_stalls.summarize(text, top=2)
    assert table[2] == ("| 3 | kda_ext::cuda::k<float> | 2.500 | 100 | 96 | 40.5 | 5.2 | "
                        "long_scoreboard 3.50, wait 1.50 |"), table
    assert ncu_stalls.summarize("no report here") == ["no ncu metrics in this output"]
    # --mix: instructions per warp by pipeline (largest first) and the memory instruction counts.
    mix = [("smsp__inst_executed_pipe_alu.sum", "inst", "1,600"), ("smsp__inst_executed_pipe_lsu.sum", "inst", "800"),
           ("smsp__inst_executed_pipe_fma.sum", "inst", "1,200"),
           ("smsp__sass_inst_executed_op_shared_ld.sum", "inst", "400"),
           ("smsp__sass_inst_executed_op_shared_st.sum", "inst", "200"),
           ("smsp__sass_inst_executed_op_global_ld.sum", "inst", "64"),
           ("smsp__sass_inst_executed_op_global_st.sum", "inst", "32")]
    text += "\n" + "\n".join(kern + f'"{n}","{u}","{v}"' for n, u, v in mix)
    assert ncu_stalls.summarize_mix(text, top=2)[2] == (
        "| 3 | kda_ext::cuda::k<float> | 100 | alu 50, fma 38 | 12, 6, 2, 1 |")
    assert ncu_stalls.summarize_mix("no report here") == []


def test_compile_check_finds_symbols_defined_twice(tmp_path):
    # check_cuda_compile.py compiles each CUDA source alone; a non-template kernel defined in a header
    # that two sources include links nowhere (session 8's first reverse-state build). Its nm pass
    # must flag a strong symbol defined in two objects and let weak (inline/template) ones repeat.
    import shutil

    import pytest

    cc, nm = shutil.which("cc") or shutil.which("gcc"), shutil.which("nm")
    if cc is None or nm is None:
        pytest.skip("needs a C compiler and nm")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import check_cuda_compile

    header = "int shared_strong(int x) { return x + 1; }\n__attribute__((weak)) int shared_weak(int x) { return x; }\n"
    objects = []
    for name in ("a", "b"):
        src = tmp_path / f"{name}.c"
        src.write_text(header + f"int only_{name}(void) {{ return shared_strong(1) + shared_weak(2); }}\n")
        obj = tmp_path / f"{name}.o"
        subprocess.run([cc, "-c", str(src), "-o", str(obj)], check=True)
        objects.append(str(obj))
    found = check_cuda_compile.duplicate_definitions(objects)
    assert set(found) == {"shared_strong"}, found
    assert found["shared_strong"] == ["a.o", "b.o"]
    assert check_cuda_compile.duplicate_definitions(objects[:1]) == {}


def test_bf16x3_error_estimate_sits_between_tf32_and_3xtf32():
    # Kernel C's bf16x3 products (kCBf16x3, bwd_bf16x3.cuh) rest on this estimate: worst error
    # about 2^-15 of sum |a||b|, far below one tf32 pass and above 3xTF32.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "dev", "bf16x3_error.py"), "--trials", "5"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    worst = {}
    for line in proc.stdout.splitlines()[1:]:
        kd, mode, w, _ = line.split()
        worst[mode] = max(worst.get(mode, -99.0), float(w))
    assert worst["bf16x3"] < -14.5, proc.stdout
    assert worst["3xtf32"] < worst["bf16x3"] - 4, proc.stdout
    assert worst["tf32"] > worst["bf16x3"] + 4, proc.stdout


# A stand-in for FlashKDA's source tree: same layout (setup.py, flash_kda/, an empty cutlass/
# where the submodule would be) and a real, tiny flash_kda_C extension, so that
# build_flashkda.sh's whole path (scratch copy, cutlass link, build, install, import check) and
# device_check.sh's flashkda step run here in seconds without nvcc.
_FAKE_FLASHKDA_SETUP = """
import os
import subprocess
from setuptools import setup, Extension
subprocess.run(["git", "submodule", "update", "--init", "cutlass"])  # as FlashKDA's setup.py does
# FlashKDA's setup.py reads CUTLASS from ./cutlass/include: the script must have linked it.
assert os.path.isfile(os.path.join("cutlass", "include", "cute", "tensor.hpp")), "cutlass not linked"
assert os.environ["FLASH_KDA_CUDA_ARCHS"] == "90a"
setup(name="flash_kda", packages=["flash_kda"], ext_modules=[Extension("flash_kda_C", ["fake_C.c"])])
"""
_FAKE_FLASHKDA_C = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static PyObject* workspace(PyObject* self, PyObject* args) {
    long long t, h, n;
    if (!PyArg_ParseTuple(args, "LLL", &t, &h, &n)) return NULL;
    return PyLong_FromLongLong(t * h + n);
}
static PyMethodDef methods[] = {{"get_workspace_size", workspace, METH_VARARGS, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "flash_kda_C", NULL, -1, methods};
PyMODINIT_FUNC PyInit_flash_kda_C(void) { return PyModule_Create(&module); }
"""


def _fake_flashkda_checkout(root, broken=False):
    """A checkout holding the two scripts, a fake .flashkda/ and fake CUTLASS headers."""
    import shutil

    (root / "scripts").mkdir(parents=True)
    for name in ("device_check.sh", "build_flashkda.sh"):
        shutil.copy(os.path.join(ROOT, "scripts", name), root / "scripts" / name)
    src = root / ".flashkda"
    (src / "flash_kda").mkdir(parents=True)
    (src / "cutlass").mkdir()
    (src / "setup.py").write_text(_FAKE_FLASHKDA_SETUP)
    (src / "fake_C.c").write_text(_FAKE_FLASHKDA_C)
    (src / "flash_kda" / "__init__.py").write_text(
        "raise ImportError('a flash_kda that builds but does not import')\n" if broken
        else "from flash_kda_C import get_workspace_size\n")
    (src / "FLASHKDA_COMMIT").write_text("0123456789abcdef\n")
    cutlass = root / "cutlass_source"
    for header in ("include/cute/tensor.hpp", "include/cutlass/cutlass.h"):
        (cutlass / header).parent.mkdir(parents=True, exist_ok=True)
        (cutlass / header).write_text("")
    return cutlass


def _device_check_flashkda(tmp_path, broken=False):
    root = tmp_path / "checkout"
    cutlass = root / "cutlass_source"
    if not root.exists():
        cutlass = _fake_flashkda_checkout(root, broken)
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), CUTLASS_SOURCE=str(cutlass),
               FLASHKDA_BUILD=str(tmp_path / "build"), FLASHKDA_TARGET=str(tmp_path / "site"))
    proc = subprocess.run(["bash", str(root / "scripts" / "device_check.sh"), "flashkda"],
                          capture_output=True, text=True, env=env, timeout=300)
    summary = proc.stdout.split("==== summary", 1)[-1]
    return proc, summary, tmp_path / "site"


def test_device_check_flashkda_step_builds_installs_and_imports(tmp_path):
    proc, summary, site = _device_check_flashkda(tmp_path)
    assert "flashkda: rc=0 build_flashkda: built in" in summary, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "import ok" in summary and "(on the bench's PYTHONPATH)" in summary
    assert (site / "flash_kda" / "__init__.py").is_file()
    # The source tree is left as it was: the build ran on a scratch copy.
    assert sorted(os.listdir(tmp_path / "checkout" / ".flashkda")) == [
        "FLASHKDA_COMMIT", "cutlass", "fake_C.c", "flash_kda", "setup.py"]
    assert os.listdir(tmp_path / "checkout" / ".flashkda" / "cutlass") == []
    # Run again: the same sources reuse the installed build; a changed source builds again.
    proc, summary, _ = _device_check_flashkda(tmp_path)
    assert "flashkda: rc=0 build_flashkda: reusing the build in" in summary and "import ok" in summary
    with open(tmp_path / "checkout" / ".flashkda" / "fake_C.c", "a") as f:
        f.write("/* changed */\n")
    proc, summary, _ = _device_check_flashkda(tmp_path)
    assert "flashkda: rc=0 build_flashkda: built in" in summary, proc.stdout[-3000:]


def test_device_check_flashkda_step_reports_a_failed_import(tmp_path):
    proc, summary, _ = _device_check_flashkda(tmp_path, broken=True)
    assert "flashkda: rc=1" in summary and "import FAILED" in summary, proc.stdout[-3000:]
    assert "(FlashKDA left out of the bench)" in summary


def test_fla_untuned_writes_a_config_every_kernel_of_a_name_lists(tmp_path, monkeypatch):
    # scripts/fla_untuned.py: one default config per FLA kernel name; for a name several kernels
    # share, the first config that all of them list; none in common: no file (they autotune).
    import json
    import types

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    monkeypatch.setenv("FLA_UNTUNED", "0")
    try:
        import fla_untuned
    finally:
        sys.path.pop(0)

    def config(**kw):
        return types.SimpleNamespace(kwargs=kw, num_warps=4, num_stages=2, num_ctas=1, maxnreg=None)

    def tuner(*configs):
        return types.SimpleNamespace(configs=list(configs))

    found = [("alone", tuner(config(BK=32), config(BK=64))),
             ("shared", tuner(config(BV=16), config(BV=32))),
             ("shared", tuner(config(BV=32), config(BV=64))),
             ("disjoint", tuner(config(BT=16))),
             ("disjoint", tuner(config(BT=32)))]
    monkeypatch.setattr(fla_untuned, "autotuners", lambda: found)
    written, skipped = fla_untuned.write_configs(str(tmp_path))
    assert (written, skipped) == (2, ["disjoint"])
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert alone == {"kernel_name": "alone",
                     "default_config": {"kwargs": {"BK": 32}, "num_warps": 4, "num_stages": 2, "num_ctas": 1}}
    assert json.loads((tmp_path / "shared.json").read_text())["default_config"]["kwargs"] == {"BV": 32}
    assert not (tmp_path / "disjoint.json").exists()


def _prebuilt_checkout(tmp_path, hash_of_sources=True):
    """A checkout with setup.py, a csrc/ file and device_check.sh, and a PREBUILT folder."""
    import gzip
    import hashlib
    import shutil

    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "csrc").mkdir()
    (root / "kda_ext").mkdir()
    shutil.copy(os.path.join(ROOT, "scripts", "device_check.sh"), root / "scripts" / "device_check.sh")
    (root / "setup.py").write_text("# setup\n")
    (root / "csrc" / "a.cu").write_text("// kernel\n")
    digest = hashlib.sha256(b"# setup\n// kernel\n").hexdigest()[:16]
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    with gzip.open(prebuilt / "_C.cpython-312-x86_64-linux-gnu.so.gz", "wb") as f:
        f.write(b"the carried build")
    (prebuilt / "_C.srchash").write_text((digest if hash_of_sources else "0" * 16) + "\n")
    (prebuilt / "_build_config.py").write_text("WITH_CUDA = True\n")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), PREBUILT=str(prebuilt))
    # an empty step list: only the set-up part of the script runs (nvidia-smi may be missing here)
    proc = subprocess.run(["bash", str(root / "scripts" / "device_check.sh"), "none"],
                          capture_output=True, text=True, env=env, timeout=120)
    return proc, root


def test_device_check_installs_a_prebuilt_of_the_same_sources(tmp_path):
    proc, root = _prebuilt_checkout(tmp_path)
    assert "prebuilt: installed from" in proc.stdout, proc.stdout + proc.stderr
    assert (root / "kda_ext" / "_C.cpython-312-x86_64-linux-gnu.so").read_bytes() == b"the carried build"
    assert (root / "kda_ext" / "_build_config.py").is_file()


def test_device_check_ignores_a_prebuilt_of_other_sources(tmp_path):
    proc, root = _prebuilt_checkout(tmp_path, hash_of_sources=False)
    assert "built from other sources" in proc.stdout and "not used" in proc.stdout, proc.stdout
    assert not (root / "kda_ext" / "_C.cpython-312-x86_64-linux-gnu.so").exists()


def test_fused_sections_parses_the_kernels_lines():
    sys.path.insert(0, os.path.join(ROOT, "scripts", "dev"))
    try:
        import fused_sections
    finally:
        sys.path.pop(0)
    text = "\n".join([
        "kda_ext sections producer raw_wait 1000 10",
        "kda_ext sections producer gates_load 3000 30",
        "noise",
        "kda_ext sections consumer full_wait 500 5",
        "clock_khz 1755000",
    ])
    rows, clock_khz = fused_sections.parse(text)
    assert rows == {"producer": [("raw_wait", 1000, 10), ("gates_load", 3000, 30)],
                    "consumer": [("full_wait", 500, 5)]}
    assert clock_khz == 1755000
    out = fused_sections.table(rows, clock_khz)
    assert "producer: 40 cycles a chunk" in out and "| gates_load | 30 | 75% |" in out
