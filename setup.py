"""fedhpc: an MPI simulator for federated LoRA fine-tuning.

A plain install is pure Python (CPU, Triton kernels run on any GPU torch sees).
`FEDHPC_BUILD_CUDA=1 pip install -e .` also builds the optional CUDA extension
`fedhpc._cuda` from `csrc/` (needs nvcc; set TORCH_CUDA_ARCH_LIST when no GPU is visible).
"""
import glob
import os

from setuptools import find_packages, setup


def cuda_extensions():
    """The optional extension: opt-in so that a CPU install never needs nvcc."""
    if os.environ.get("FEDHPC_BUILD_CUDA", "0") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        name="fedhpc._cuda",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="fedhpc",
    version="0.1.0",
    description="MPI-based HPC simulator for federated LoRA fine-tuning of foundation models",
    packages=find_packages(include=["fedhpc", "fedhpc.*"]),
    package_data={"fedhpc": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch", "timm", "peft", "transformers", "safetensors", "h5py", "mpi4py",
        "numpy", "scipy", "scikit-learn", "pyyaml",
    ],
    extras_require={"triton": ["triton"], "plots": ["matplotlib"]},
    entry_points={"console_scripts": ["fedhpc = fedhpc.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
