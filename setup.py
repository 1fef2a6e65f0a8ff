"""Builds qlora's operator library with CMake (CMakeLists.txt) and packages it with the Python layer.

    pip install --no-build-isolation .        # or -e . for development

CUDA kernels are compiled when torch has CUDA and nvcc is found; TORCH_CUDA_ARCH_LIST picks the
targets (default "8.0;9.0a"), MAX_JOBS the parallel compile jobs, QLORA_WITH_CUDA=0 skips CUDA.
The CMake build folder is build/cmake, so `ctest --test-dir build/cmake` runs the C++ tests afterwards.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
OPS_LIBRARY = "libqlora_ops.so"  # every torch.ops.qlora operator; qlora._C links it


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        lib_dir = build_dir / "lib"  # stays after the build, so ctest finds the library there
        args = [
            f"-DQLORA_OUTPUT_DIR={lib_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DTORCH_ROOT={Path(torch.__file__).parent}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        with_cuda = os.environ.get("QLORA_WITH_CUDA")
        if with_cuda is not None:
            args.append(f"-DQLORA_WITH_CUDA={'ON' if with_cuda not in ('0', 'OFF', 'off') else 'OFF'}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and "Ninja" not in cache.read_text() and "-GNinja" in args:
            args.remove("-GNinja")  # keep the generator an existing build folder was made with
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        out_dir.mkdir(parents=True, exist_ok=True)
        for built in lib_dir.iterdir():
            if built.suffix == ".so":
                shutil.copy2(built, out_dir / built.name)

    def copy_extensions_to_source(self):
        # setuptools copies only the extension module into the source tree; the library it links goes too.
        super().copy_extensions_to_source()
        inplace, self.inplace = self.inplace, False
        built = Path(self.get_ext_fullpath("qlora._C")).parent / OPS_LIBRARY
        self.inplace = inplace
        shutil.copy2(built, ROOT / "python" / "qlora" / OPS_LIBRARY)

    def get_outputs(self):
        outputs = super().get_outputs()
        return outputs + [str(Path(p).parent / OPS_LIBRARY) for p in outputs]


setup(
    ext_modules=[CMakeExtension("qlora._C")],
    cmdclass={"build_ext": CMakeBuild},
)
