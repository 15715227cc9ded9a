"""Build of ffkernels and its compiled extension ``ffkernels._C``.

    pip install --no-build-isolation .          # or -e . ; needs torch installed first

Environment switches (all optional):
    FFKERNELS_CUDA=auto|0|1   compile the CUDA kernels: when a toolkit is found (auto, default), never, always
    CUDA_HOME                 the CUDA toolkit root (the folder with bin/nvcc and lib64/libcudart.so)
    TORCH_CUDA_ARCH_LIST      GPU archs to compile for; default "8.0;9.0" (A100, H100)
    MAX_JOBS                  parallel compile jobs; default 2 (one nvcc job can take GBs of memory)
    FFKERNELS_NO_EXT=1        skip the extension entirely (pure-Python install: reference and triton only)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tools.cuda_home import find_cuda_home  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def log(msg):
    print(f"[ffkernels build] {msg}", file=sys.stderr, flush=True)


def extension_modules():
    if os.environ.get("FFKERNELS_NO_EXT", "0") == "1":
        log("FFKERNELS_NO_EXT=1: not building ffkernels._C (backends: reference, triton)")
        return [], {}
    mode = os.environ.get("FFKERNELS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1", "off", "on"):
        sys.exit(f"FFKERNELS_CUDA must be auto, 0/off or 1/on, got {mode!r}")
    cuda_home = None if mode in ("0", "off") else find_cuda_home()
    if mode in ("1", "on") and cuda_home is None:
        sys.exit("FFKERNELS_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder holding "
                 "bin/nvcc and lib64/libcudart.so")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if cuda_home is not None and not cuda_sources:
        log(f"CUDA toolkit found at {cuda_home}, but this tree has no CUDA kernels (csrc/cuda/*.cu)")
        cuda_home = None
    with_cuda = cuda_home is not None
    if with_cuda:
        # must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", "2")

    from torch.utils import cpp_extension as ce

    sources = sorted(glob.glob("csrc/*.cpp")) + ["python_api/ff_api.cpp"]
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    define = []
    if with_cuda:
        ce.CUDA_HOME = cuda_home  # in case torch was imported earlier with a wrong guess
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += cuda_sources
        define = [("FF_WITH_CUDA", None), ("FF_CUDA_ARCHS", f'"{archs}"')]
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        ext = ce.CUDAExtension("ffkernels._C", sources, define_macros=define,
                               extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
        log(f"building ffkernels._C: CPU + CUDA kernels (toolkit {cuda_home}, archs {archs}, "
            f"MAX_JOBS={os.environ['MAX_JOBS']})")
    else:
        ext = ce.CppExtension("ffkernels._C", sources, extra_compile_args={"cxx": cxx},
                              extra_link_args=["-fopenmp"])
        why = "FFKERNELS_CUDA=0" if mode in ("0", "off") else "no CUDA toolkit found"
        log(f"building ffkernels._C: CPU kernels only ({why}; MAX_JOBS={os.environ['MAX_JOBS']})")
    return [ext], {"build_ext": persistent_build_ext(ce.BuildExtension, with_cuda).with_options(use_ninja=True)}


def persistent_build_ext(base, with_cuda: bool):
    """build_ext whose object files stay in build/ between installs, so ninja recompiles only what changed.

    pip gives every `pip install -e` a fresh temporary build folder, which makes ninja rebuild the whole
    extension (minutes with CUDA). The folder is keyed by Python, torch and CUDA-or-not, so switching
    any of them cannot reuse an incompatible object; ninja itself rebuilds an object whose command line
    (flags, archs) changed."""
    import torch

    tag = (f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-"
           f"{'cuda' if with_cuda else 'cpu'}")

    class BuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(HERE, "build", f"temp-{tag}")

    return BuildExt


ext_modules, cmdclass = extension_modules()
setup(
    packages=find_packages(include=["ffkernels", "ffkernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
