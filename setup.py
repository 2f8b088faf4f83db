"""Build fastblocks and its compiled extension ``fastblocks._C``.

The extension is a CppExtension (``csrc/ops.cpp`` + ``csrc/cpu/*.cpp``) on CPU-only PyTorch
and a CUDAExtension (adding ``csrc/cuda/*``) when PyTorch was built with CUDA.

Environment switches (all optional):

``FASTBLOCKS_SKIP_EXTENSION=1``   build no extension at all (reference and Triton paths only).
``FASTBLOCKS_SKIP_CUDA_BUILD=1``  build only the CPU part even on CUDA PyTorch.
``FASTBLOCKS_CUDA_ARCHS``         CUDA archs, default ``"8.0;9.0"`` (Ampere sm_80, Hopper sm_90).
``FASTBLOCKS_CPU_ARCH``           ``auto`` (default: AVX2+FMA when this CPU has them) or ``generic``.
``FASTBLOCKS_DEBUG=1``            compile with -O0 -g.

Build with ``pip install --no-build-isolation .``: an isolated build would install a second,
different torch to compile against, and the extension would not load in the one you have.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


def _cpu_arch_flags() -> list[str]:
    """Vector ISA flags for the CPU kernels (at::vec picks its AVX2 path from these)."""
    choice = os.environ.get("FASTBLOCKS_CPU_ARCH", "auto").strip().lower()
    if choice == "generic" or platform.machine() not in {"x86_64", "AMD64"}:
        return []
    if choice not in {"auto", "avx2"}:
        raise ValueError(f"FASTBLOCKS_CPU_ARCH must be 'auto', 'avx2' or 'generic', got {choice!r}")
    if choice == "auto":
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            return []
        if " avx2" not in flags or " fma" not in flags:
            return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


# nvcc flags of the real build; `make cuda-compile` (CI, no CUDA PyTorch) compiles every .cu file
# with the same ones (`python setup.py --print-flags nvcc`). No --use_fast_math: it flushes
# subnormals to zero and approximates the divisions and square roots of the statistics (1/sqrt(var
# + eps)), which the CPU kernels, Triton and eager PyTorch compute exactly rounded.
NVCC_FLAGS = ["-std=c++20", "-lineinfo"]
CXX_FLAGS = ["-std=c++20", "-fopenmp"]


def _extensions() -> list:
    if _flag("FASTBLOCKS_SKIP_EXTENSION"):
        print("fastblocks: FASTBLOCKS_SKIP_EXTENSION set, building no compiled extension")
        return []
    import torch
    from torch.utils import cpp_extension

    debug = _flag("FASTBLOCKS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = [os.path.join("csrc", "ops.cpp"), *sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))]
    cxx = [*opt, *CXX_FLAGS, *_cpu_arch_flags()]
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _flag("FASTBLOCKS_SKIP_CUDA_BUILD")
    )
    if not with_cuda:
        return [
            cpp_extension.CppExtension(
                "fastblocks._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
            )
        ]
    archs = os.environ.get("FASTBLOCKS_CUDA_ARCHS", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = [*opt, *NVCC_FLAGS]
    return [
        cpp_extension.CUDAExtension(
            "fastblocks._C",
            sources,
            define_macros=[("FASTBLOCKS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _cmdclass() -> dict:
    if _flag("FASTBLOCKS_SKIP_EXTENSION"):
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__" and sys.argv[1:2] == ["--print-flags"]:
    # `python setup.py --print-flags nvcc|cxx`: the real build's flags, for `make cuda-compile`.
    which = sys.argv[2] if len(sys.argv) > 2 else "nvcc"
    print(" ".join(["-O3", *NVCC_FLAGS] if which == "nvcc" else ["-O3", *CXX_FLAGS, *_cpu_arch_flags()]))
    sys.exit(0)

setup(
    name="fastblocks",
    version="0.1.0",
    description="Fused GPU building blocks (BatchNorm-ReLU-Conv, add+ReLU, dense blocks) for ResNet and DenseNet in PyTorch",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastblocks", "fastblocks.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    # The core (ops, modules, models) needs torch, and Triton where it runs; the tooling's
    # dependencies are extras: `fastblocks bench`/`memory` (charts, progress bars) need [bench],
    # `fastblocks train`/`experiment` need [train]; a command whose extra is missing says which.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "bench": ["matplotlib", "tqdm"],
        # scikit-learn's bundled digits: `fastblocks train/experiment --data digits` and tests/train.
        "train": ["numpy", "tqdm", "matplotlib", "scikit-learn"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.6"],
        "all": ["matplotlib", "tqdm", "numpy", "scikit-learn"],
    },
    entry_points={"console_scripts": ["fastblocks = fastblocks.cli:main"]},
    zip_safe=False,
)
