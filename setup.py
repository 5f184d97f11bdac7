"""Builds lmcache_ext._C with CMake + ninja + pybind11.

Switches (environment):
  LMCACHE_EXT_CUDA=1|0      force the CUDA kernels on or off (default: on when nvcc is found)
  LMCACHE_EXT_CUDA_ARCHS    e.g. "90;100" (default "80;86;89;90;100;120", PTX for the newest)
  MAX_JOBS                  parallel compile jobs
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME, then /usr/local/cuda, then PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_requested() -> tuple[bool, str | None]:
    flag = os.environ.get("LMCACHE_EXT_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"LMCACHE_EXT_CUDA = {flag!r}: expected 1, 0 or unset")
    nvcc = find_nvcc()
    if flag == "0":
        return False, None
    if flag == "1" and nvcc is None:
        raise SystemExit("LMCACHE_EXT_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return nvcc is not None, nvcc


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        use_cuda, nvcc = cuda_requested()
        version = self.distribution.get_version()
        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLMCACHE_EXT_OUTPUT_DIR={out_dir}",
            f"-DLMCACHE_EXT_VERSION={version}",
            f"-DLMCACHE_EXT_CUDA={'ON' if use_cuda else 'OFF'}",
        ]
        if use_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            archs = os.environ.get("LMCACHE_EXT_CUDA_ARCHS")
            if archs:
                args.append(f"-DLMCACHE_EXT_CUDA_ARCHS={archs}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("lmcache_ext._C")], cmdclass={"build_ext": CMakeBuild})
