"""Build driver: setuptools hands every extension to one CMake + ninja build.

Environment:
  CBTM_CUDA=auto|0|1      build cbtm._cuda (auto: when nvcc is found)
  CBTM_CUDA_ARCHS="80;90a" CUDA architectures
  CBTM_BUILD_TYPE=Release CMake build type
  CBTM_SANITIZE=1         build cbtm._C with AddressSanitizer + UBSan (tests then need
                          LD_PRELOAD=$(gcc -print-file-name=libasan.so); .ci/sanitize does it all)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def want_cuda():
    flag = os.environ.get("CBTM_CUDA", "auto").lower()
    if flag in ("0", "off", "false", "no"):
        return None
    nvcc = find_nvcc()
    if flag in ("1", "on", "true", "yes") and nvcc is None:
        raise RuntimeError("CBTM_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extensions(self):
        import pybind11

        nvcc = want_cuda()
        ext_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        ninja = shutil.which("ninja")
        if ninja is None:
            import ninja as ninja_pkg

            ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CBTM_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCBTM_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DCBTM_SANITIZE={'ON' if os.environ.get('CBTM_SANITIZE', '0') not in ('', '0') else 'OFF'}",
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            args.append(f"-DCBTM_CUDA_ARCHS={os.environ.get('CBTM_CUDA_ARCHS', '80;90a')}")
        subprocess.run(["cmake", *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], check=True)


extensions = [CMakeExtension("cbtm._C")]
if want_cuda():
    extensions.append(CMakeExtension("cbtm._cuda"))

setup(ext_modules=extensions, cmdclass={"build_ext": CMakeBuild})
