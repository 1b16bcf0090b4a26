"""scripts/cuda_home.py: finding the CUDA toolkit through env vars, symlinks, wrapper scripts, nvcc -dryrun."""
import importlib.util
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "cuda_home.py")

_spec = importlib.util.spec_from_file_location("cuda_home_under_test", SCRIPT)
cuda_home = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_home)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="shell wrapper scripts")


def _exe(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _toolkit(root):
    """A fake toolkit: include/cuda_runtime.h and a bin/nvcc that answers -dryrun like nvcc does."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    _exe(root / "bin" / "nvcc",
         "#!/bin/sh\n"
         'here="$(cd "$(dirname "$0")" && pwd)"\n'
         'for a in "$@"; do\n'
         '  if [ "$a" = -dryrun ]; then\n'
         '    echo "#\\$ _HERE_=$here"\n'
         '    echo "#\\$ TOP=$here/.."\n'
         '    echo "#\\$ INCLUDES=\\"-I$here/../include\\""\n'
         "    exit 0\n"
         "  fi\n"
         "done\n"
         "echo 'nvcc: fake'\n")
    return root


def _env(path_dirs, **extra):
    env = {"PATH": os.pathsep.join(str(p) for p in path_dirs)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


NO_DEFAULTS = ()


def test_cuda_home_env_var_wins(tmp_path):
    tk = _toolkit(tmp_path / "cuda-12.8")
    other = _toolkit(tmp_path / "cuda-13.0")
    f = cuda_home.locate(_env([other / "bin"], CUDA_HOME=tk), default_dirs=NO_DEFAULTS)
    assert f.home == str(tk) and f.how == "$CUDA_HOME"


def test_cuda_path_used_when_cuda_home_is_not_a_toolkit(tmp_path):
    tk = _toolkit(tmp_path / "tk")
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    f = cuda_home.locate(_env([], CUDA_HOME=bogus, CUDA_PATH=tk), default_dirs=NO_DEFAULTS)
    assert f.home == str(tk) and f.how == "$CUDA_PATH"
    assert any(str(bogus) in t and "$CUDA_HOME" in t for t in f.tried)


def test_nvcc_inside_toolkit(tmp_path):
    tk = _toolkit(tmp_path / "tk")
    f = cuda_home.locate(_env([tk / "bin"]), default_dirs=NO_DEFAULTS)
    assert f.home == str(tk)
    assert f.nvcc == str(tk / "bin" / "nvcc")


def test_nvcc_symlink_followed(tmp_path):
    tk = _toolkit(tmp_path / "opt" / "cuda-13.0")
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    os.symlink(tk / "bin" / "nvcc", tmp_path / "usr" / "bin" / "nvcc")
    f = cuda_home.locate(_env([tmp_path / "usr" / "bin"]), default_dirs=NO_DEFAULTS)
    assert f.home == str(tk)
    assert "->" in f.how


def test_wrapper_script_exec_parsed(tmp_path):
    # the layout of /usr/local/bin/nvcc -> `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
    tk = _toolkit(tmp_path / "cuda-13.0")
    wrapper = _exe(tmp_path / "local" / "bin" / "nvcc", f'#!/bin/sh\nexec {tk}/bin/nvcc "$@"\n')
    assert cuda_home.wrapper_targets(str(wrapper)) == [f"{tk}/bin/nvcc"]
    f = cuda_home.locate(_env([wrapper.parent]), default_dirs=NO_DEFAULTS)
    assert f.home == str(tk)
    assert "wrapper script" in f.how
    # the wrong guess (the wrapper's parent, as torch would take) was looked at and rejected
    assert any(t.startswith(str(tmp_path / "local") + " ") for t in f.tried)


def test_wrapper_script_asked_with_dryrun(tmp_path):
    # a wrapper whose target is computed at run time: only nvcc itself can tell
    tk = _toolkit(tmp_path / "sdk" / "cuda")
    wrapper = _exe(tmp_path / "local" / "bin" / "nvcc",
                   '#!/bin/sh\nd="$(dirname "$0")"\nexec "$d/../../sdk/cuda/bin/nvcc" "$@"\n')
    assert cuda_home.wrapper_targets(str(wrapper)) == []
    f = cuda_home.locate(_env([wrapper.parent, "/usr/bin", "/bin"]), default_dirs=NO_DEFAULTS)
    assert f.home == os.path.normpath(str(tk))
    assert "-dryrun" in f.how


def test_dryrun_include_dir_of_targets_layout(tmp_path):
    assert cuda_home._home_of_include("/opt/cuda/bin/../targets/x86_64-linux/include") == "/opt/cuda"
    assert cuda_home._home_of_include("/opt/cuda/include") == "/opt/cuda"


def test_default_dirs_newest_version_first(tmp_path):
    _toolkit(tmp_path / "cuda-12.8")
    _toolkit(tmp_path / "cuda-12.10")
    (tmp_path / "cuda-13.0").mkdir()  # no headers: skipped
    f = cuda_home.locate(_env([]), default_dirs=(str(tmp_path / "cuda"), str(tmp_path / "cuda-*")))
    assert f.home == str(tmp_path / "cuda-12.10")
    assert f.how == "default location"
    assert any("cuda-13.0" in t for t in f.tried)


def test_nothing_found_says_what_was_tried(tmp_path):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    f = cuda_home.locate(_env([tmp_path], CUDA_HOME=bogus), default_dirs=(str(tmp_path / "cuda"),))
    assert f.home is None
    msg = f.describe()
    assert msg.startswith("no CUDA toolkit found")
    assert str(bogus) in msg and "nvcc (not on PATH)" in msg and str(tmp_path / "cuda") in msg


def test_cli_prints_home_and_include(tmp_path):
    tk = _toolkit(tmp_path / "tk")
    env = dict(os.environ, CUDA_HOME=str(tk))
    out = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(tk)
    out = subprocess.run([sys.executable, SCRIPT, "--include"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(tk / "include")


def test_cli_fails_without_toolkit(tmp_path, capsys):
    rc = cuda_home.main(["--explain"], environ={"PATH": str(tmp_path), "CUDA_HOME": str(tmp_path)},
                        default_dirs=())
    out = capsys.readouterr()
    assert rc == 1
    assert "no CUDA toolkit found" in out.out and str(tmp_path) in out.out
    rc = cuda_home.main([], environ={"PATH": str(tmp_path)}, default_dirs=())
    assert rc == 1 and "no CUDA toolkit found" in capsys.readouterr().err
