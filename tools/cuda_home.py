"""Finding the real CUDA toolkit root at build time (used by setup.py; no torch import here).

torch.utils.cpp_extension guesses CUDA_HOME from the `nvcc` on PATH; where that nvcc is a wrapper script
(as on machines that put a small shim on PATH), the guess is wrong and linking fails on -lcudart.
"""
import glob
import os
import shutil


def _is_toolkit_root(root):
    if not root or not os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return False
    libdirs = ["lib64", "lib", os.path.join("targets", "*", "lib")]
    return any(glob.glob(os.path.join(root, d, "libcudart.so*")) for d in libdirs)


def _roots_named_by_nvcc_on_path():
    """Toolkit roots implied by the nvcc on PATH, seeing through symlinks and wrapper scripts."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return []
    real = os.path.realpath(nvcc)
    roots = [os.path.dirname(os.path.dirname(real))]
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return roots
    if head.startswith(b"#!"):  # a wrapper script: look for the real nvcc it execs
        for token in head.decode("utf-8", "replace").replace('"', " ").replace("'", " ").split():
            if token.endswith("/bin/nvcc"):
                roots.append(os.path.dirname(os.path.dirname(os.path.realpath(token))))
    return roots


def _version_key(path):
    """cuda-13.0 sorts above cuda-9.2 (a numeric, not a lexicographic, order)."""
    tail = os.path.basename(path).split("-", 1)[-1]
    return tuple(int(p) if p.isdigit() else -1 for p in tail.split("."))


def find_cuda_home():
    """The real CUDA toolkit root, or None. torch's own guess is wrong when nvcc is a wrapper script."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += _roots_named_by_nvcc_on_path()
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    candidates += ["/opt/cuda"]
    for root in candidates:
        if _is_toolkit_root(root):
            return os.path.realpath(root)
    return None
