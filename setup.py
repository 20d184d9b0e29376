from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = "doublesqueeze.pth"        # runs `import dsq_autohook` at start-up: see dsq_autohook.py


class BuildPyWithPth(build_py):
    """Puts doublesqueeze.pth at the root of the build (so of the wheel: site-packages), beside the packages."""

    def run(self):
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib, PTH)), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib, PTH))]

setup(
    name="doublesqueeze",
    version="0.2.0",
    description="DoubleSqueeze: double-pass error-compensated compressed SGD for PyTorch DDP, Horovod, DeepSpeed "
                "and an asynchronous parameter server",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["dsq_plugins", "dsq_plugins.*", "horovod_ext", "horovod_ext.*",
                                    "deepspeed_ext", "deepspeed_ext.*", "async_ps", "async_ps.*"]),
    py_modules=["dsq_autohook"],
    cmdclass={"build_py": BuildPyWithPth},
    install_requires=["torch>=2.1", "numpy", "tensorboard", "tqdm"],
    extras_require={
        "horovod": ["horovod==0.28.1"],
        "deepspeed": ["deepspeed>=0.19", "pydantic>=2"],
        "async": ["pyzmq>=25", "numba>=0.59"],
        "lightning": ["lightning>=2.2"],
        "transformers": ["transformers>=4.40", "accelerate>=0.30"],
        "all": ["horovod==0.28.1", "deepspeed>=0.19", "pydantic>=2", "pyzmq>=25", "numba>=0.59", "lightning>=2.2",
                "transformers>=4.40", "accelerate>=0.30"],
        "test": ["pytest", "hypothesis", "scikit-learn", "matplotlib", "transformers>=4.40", "accelerate>=0.30",
                 "lightning>=2.2"],
    },
    entry_points={
        "console_scripts": [
            "dsq-horovodrun = horovod_ext.launcher:main",
            "dsq-async-ps = async_ps.launcher:main",
        ],
    },
)
