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
    for name in ("device_check.sh", "setup_env.sh", "test.sh", "demo.sh"):
        proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", name)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
