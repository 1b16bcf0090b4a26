"""Find the CUDA toolkit (the directory with ``include/cuda_runtime.h``).

Used by ``setup.py`` (loaded by path, before torch's extension tooling is
imported, so it never imports sparsekit) and by ``scripts/compile_csrc.sh``.
torch's own detection takes ``dirname(dirname(which nvcc))``, which is wrong
where ``nvcc`` on PATH is a wrapper script outside the toolkit (e.g.
``/usr/local/bin/nvcc`` containing ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``
gives ``/usr/local``, and the build then fails with ``cuda_runtime.h: No such
file``).  The order here:

1. ``$CUDA_HOME``, then ``$CUDA_PATH``, if it holds ``include/cuda_runtime.h``;
2. ``nvcc`` (``$NVCC`` or the one on PATH): its real location with symlinks
   followed; if that is no toolkit and nvcc is a script, the absolute nvcc
   path it ``exec``s; then what ``nvcc -dryrun`` reports as its ``TOP``
   (nvcc's own install root) and its include directories;
3. ``/usr/local/cuda``, then ``/usr/local/cuda-*`` (newest version first).

Command line::

    python scripts/cuda_home.py            # prints the toolkit; exit 1 (and what was tried) if none
    python scripts/cuda_home.py --include  # prints its include directory
    python scripts/cuda_home.py --explain  # how it was found, and every candidate tried
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Callable, List, Mapping, Optional, Sequence

HEADER = os.path.join("include", "cuda_runtime.h")
DEFAULT_DIRS = ("/usr/local/cuda", "/usr/local/cuda-*")
# an absolute path to an nvcc binary that a wrapper script hands over to
_EXEC_RE = re.compile(r"""\bexec\s+(?:-a\s+\S+\s+)?["']?(/[^\s"';|&]*/nvcc)["']?(?=[\s;]|$)""", re.M)
_NVCC_PATH_RE = re.compile(r"""(?<![^\s"'=])["']?(/[^\s"';|&=]*/bin/nvcc)["']?(?=[\s;]|$)""", re.M)
_TOP_RE = re.compile(r"^#\$ TOP=(.+?)\s*$", re.M)
_INCLUDE_RE = re.compile(r"""-I\s*"?([^"\s]+)"?""")


def is_toolkit(path: Optional[str]) -> bool:
    """Whether ``path`` is a CUDA toolkit root (has ``include/cuda_runtime.h``)."""
    return bool(path) and os.path.isfile(os.path.join(path, HEADER))


class Finding:
    """The toolkit found (``home`` is None if none), how, and every candidate looked at."""

    def __init__(self) -> None:
        # a plain class: this file is loaded by path (setup.py), outside sys.modules
        self.home: Optional[str] = None
        self.how = ""
        self.nvcc: Optional[str] = None
        self.tried: List[str] = []

    def describe(self) -> str:
        if self.home:
            return f"CUDA toolkit {self.home} (from {self.how})"
        return "no CUDA toolkit found; tried: " + ("; ".join(self.tried) or "nothing")


def _home_of_nvcc(nvcc_path: str) -> str:
    # <home>/bin/nvcc
    return os.path.dirname(os.path.dirname(nvcc_path))


def _home_of_include(inc: str) -> str:
    inc = os.path.normpath(inc)
    parts = inc.split(os.sep)
    # <home>/targets/<arch>/include is where nvcc's -I points; <home>/include
    # is the (symlinked) public view of it
    if len(parts) >= 4 and parts[-1] == "include" and parts[-3] == "targets":
        return os.sep.join(parts[:-3]) or os.sep
    return os.path.dirname(inc)


def _read_script(path: str, limit: int = 65536) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    return head.decode("utf-8", "replace")


def wrapper_targets(path: str) -> List[str]:
    """Absolute nvcc paths that the wrapper script at ``path`` runs (``exec`` lines first)."""
    text = _read_script(path)
    if text is None:
        return []
    out: List[str] = []
    for rx in (_EXEC_RE, _NVCC_PATH_RE):
        for m in rx.finditer(text):
            p = m.group(1)
            if p not in out and os.path.realpath(p) != os.path.realpath(path):
                out.append(p)
    return out


def dryrun_homes(nvcc: str, env: Optional[Mapping[str, str]] = None, timeout: float = 30.0) -> List[str]:
    """Toolkit roots reported by ``nvcc -dryrun`` (which runs nothing): its TOP, then its -I dirs."""
    cmd = [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=dict(env) if env is not None else None)
    except (OSError, subprocess.SubprocessError):
        return []
    text = (r.stdout or "") + (r.stderr or "")
    out: List[str] = []
    for m in _TOP_RE.finditer(text):
        out.append(os.path.normpath(m.group(1).strip().strip('"')))
    for line in text.splitlines():
        if line.startswith("#$ INCLUDES=") or line.startswith("#$ gcc") or line.startswith("#$ cicc"):
            for m in _INCLUDE_RE.finditer(line):
                out.append(_home_of_include(m.group(1)))
    seen: List[str] = []
    for h in out:
        if h not in seen:
            seen.append(h)
    return seen


def _sorted_default_dirs(patterns: Sequence[str]) -> List[str]:
    out: List[str] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            def key(p: str):
                m = re.search(r"(\d+(?:\.\d+)*)$", p)
                return tuple(int(x) for x in m.group(1).split(".")) if m else ()
            hits = sorted(glob.glob(pat), key=key, reverse=True)
        else:
            hits = [pat]
        for h in hits:
            if h not in out:
                out.append(h)
    return out


def locate(environ: Optional[Mapping[str, str]] = None,
           default_dirs: Sequence[str] = DEFAULT_DIRS,
           which: Callable[..., Optional[str]] = shutil.which) -> Finding:
    """Find the CUDA toolkit; ``environ`` defaults to ``os.environ`` (its PATH is searched for nvcc)."""
    env = os.environ if environ is None else environ
    f = Finding()

    def take(path: Optional[str], how: str) -> bool:
        if not path:
            return False
        if is_toolkit(path):
            f.home, f.how = os.path.abspath(path), how
            return True
        f.tried.append(f"{path} ({how}: no {HEADER})")
        return False

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if take(env.get(var), f"${var}"):
            return f

    nvcc = env.get("NVCC") or None
    if nvcc and os.sep not in nvcc:
        nvcc = which(nvcc, path=env.get("PATH"))
    if nvcc is None:
        nvcc = which("nvcc", path=env.get("PATH"))
    if nvcc:
        f.nvcc = nvcc
        real = os.path.realpath(nvcc)
        how = f"nvcc at {nvcc}" + (f" -> {real}" if real != nvcc else "")
        if take(_home_of_nvcc(real), how):
            return f
        for target in wrapper_targets(real):
            if take(_home_of_nvcc(os.path.realpath(target)), f"wrapper script {real} runs {target}"):
                return f
        for home in dryrun_homes(nvcc, env=env):
            if take(home, f"`{nvcc} -dryrun`"):
                return f
    else:
        f.tried.append("nvcc (not on PATH)")

    for d in _sorted_default_dirs(default_dirs):
        if take(d, "default location"):
            return f
    return f


def find_cuda_home(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The CUDA toolkit root, or None."""
    return locate(environ).home


def main(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None,
         default_dirs: Sequence[str] = DEFAULT_DIRS) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    f = locate(environ, default_dirs=default_dirs)
    if "--explain" in args:
        print(f.describe())
        if f.nvcc:
            print(f"nvcc: {f.nvcc}")
        for t in f.tried:
            print(f"  tried {t}")
        return 0 if f.home else 1
    if not f.home:
        print(f"cuda_home: {f.describe()}", file=sys.stderr)
        return 1
    print(os.path.join(f.home, "include") if "--include" in args else f.home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
