"""Build and install fastvae (distribution name ``fastvae-kernels``).

torch must be installed first (the native extension is compiled against it), then::

    pip install --no-build-isolation -e .

builds ``fastvae._C`` with CMake + Ninja from CMakeLists.txt (the one build description).
pyproject.toml declares the build system, so that any pip from 23 on takes the standard
editable path (PEP 660) rather than the legacy ``setup.py develop``. torch is deliberately not
in ``install_requires``: pip could otherwise replace a CPU or custom build of torch with the
default CUDA wheel.
"""
import os
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, placing the module where setuptools expects it."""

    def build_extension(self, ext):
        import torch  # the build is against the installed torch: hence --no-build-isolation
        from torch.utils.cpp_extension import CUDA_HOME

        output_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        configure = [
            "cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFASTVAE_OUTPUT_DIR={output_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        # CUDA kernels need both a CUDA build of torch and a CUDA toolkit.
        if torch.version.cuda is not None and CUDA_HOME is not None:
            configure += ["-DFASTVAE_WITH_CUDA=ON",
                          f"-DCMAKE_CUDA_COMPILER={os.path.join(CUDA_HOME, 'bin', 'nvcc')}"]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", build_dir, "--parallel", str(os.cpu_count() or 1)],
                       check=True)


setup(
    name="fastvae-kernels",
    version="0.1.0",
    description="Fused kernels for the variational-autoencoder loss",
    packages=["fastvae", "fastvae.backends", "fastvae.kernels"],
    package_dir={"fastvae": "fastvae", "fastvae.kernels": "kernels"},
    ext_modules=[CMakeExtension("fastvae._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    extras_require={
        "test": ["pytest", "pytest-xdist", "scipy", "scikit-learn", "expecttest", "hypothesis"],
        "bench": ["matplotlib", "pytest-benchmark", "scikit-learn"],
        "examples": ["scikit-learn"],  # examples/train_digits.py loads sklearn's bundled digits
    },
)
