# tests/test_readme.py: every ```python block of README.md runs as written (so the README cannot rot).
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_has_a_python_example():
    blocks = _python_blocks()
    assert blocks, "README.md has no ```python block"
    assert any("A_log" in b and "backward" in b and "torch.compile" in b for b in blocks), \
        "the README example should show A_log/dt_bias, a backward and torch.compile"


def _fla_import_error():
    try:
        import fla.ops.kda  # noqa: F401
    except Exception as error:  # ImportError, or an FLA that fails to import here
        return f"{type(error).__name__}: {error}"
    return None


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    code = _python_blocks()[index]
    uses_fla = re.search(r"^(from|import) fla\b", code, flags=re.MULTILINE) is not None
    if uses_fla and _fla_import_error() is not None:
        pytest.skip(f"README block {index} uses flash-linear-attention, which is not importable "
                    f"({_fla_import_error()}); pip install flash-linear-attention triton")
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code, encoding="utf-8")
    # A fresh interpreter, as a reader would run it; the in-place build of kda_ext comes from ROOT,
    # the working directory is elsewhere so that nothing relies on the checkout being the cwd.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KDA_EXT_CHECK_INPUTS", None)
    # FLA warns on import on a machine without a GPU (its Triton kernels cannot run there).
    quiet_fla = ["-W", "ignore:Triton is not supported on current platform:UserWarning"] * uses_fla
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", *quiet_fla, str(script)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, \
        f"README block {index} failed:\n{code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
