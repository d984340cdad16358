"""fedhpc: an MPI simulator for federated LoRA fine-tuning.

A plain install is pure Python (CPU, Triton kernels run on any GPU torch sees).
`FEDHPC_BUILD_CUDA=1 pip install -e .` also builds the optional CUDA extension
`fedhpc._cuda` from `csrc/` (needs nvcc and a CUDA build of torch; TORCH_CUDA_ARCH_LIST defaults to 9.0 when no GPU is visible).
"""
import glob
import os
import re

from setuptools import find_packages, setup


def cuda_extensions():
    """The optional extension: opt-in so that a CPU install never needs nvcc.

    With no GPU visible and no TORCH_CUDA_ARCH_LIST, it targets sm_90 (H100/H200). When torch
    came from pip, cudart is linked from torch's own nvidia wheel, e.g.
    <site-packages>/nvidia/cu13/lib, which ships `libcudart.so.13` but no unversioned
    `libcudart.so`: the library is named by file, and the extension uses the very runtime
    torch loads. bindings.cpp needs no CUDA headers (see csrc/fedhpc_cuda.h).
    """
    if os.environ.get("FEDHPC_BUILD_CUDA", "0") != "1":
        return [], {}
    import importlib.util

    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        raise RuntimeError(
            f"FEDHPC_BUILD_CUDA=1 needs a CUDA build of torch, got torch {torch.__version__}"
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        name="fedhpc._cuda",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    cudart = f"libcudart.so.{torch.version.cuda.split('.')[0]}"
    spec = importlib.util.find_spec("nvidia")  # namespace package of the nvidia-* wheels
    wheel_roots = list(spec.submodule_search_locations or []) if spec else []
    for root in wheel_roots:
        found = sorted(glob.glob(os.path.join(root, "*", "lib", cudart)))
        if found:
            lib_dir = os.path.dirname(found[0])
            ext.library_dirs.append(lib_dir)
            ext.libraries = [f":{cudart}" if lib == "cudart" else lib for lib in ext.libraries]
            break
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="fedhpc",
    version=re.search(r'__version__ = "(.+?)"', open("fedhpc/__init__.py").read()).group(1),
    description="MPI-based HPC simulator for federated LoRA fine-tuning of foundation models",
    packages=find_packages(include=["fedhpc", "fedhpc.*"]),
    package_data={"fedhpc": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch", "timm", "peft", "transformers", "safetensors", "h5py", "mpi4py",
        "mpich",  # the MPI library mpi4py loads (a cluster's own MPI: see the README's Slurm section)
        "numpy", "scipy", "scikit-learn", "pyyaml", "pillow",
    ],
    extras_require={"triton": ["triton"], "plots": ["matplotlib"], "hf": ["datasets"],
                    "tensorboard": ["tensorboard"]},
    entry_points={"console_scripts": ["fedhpc = fedhpc.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
