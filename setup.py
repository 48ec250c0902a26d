"""isle-fast: the ISLE class-wise pseudo-label ensemble as a fast array pipeline."""

from setuptools import setup

# torch and torchvision are taken together: torchvision >= 0.29 pulls the matching
# torch wheel from the index (a stray CPU-only torch wheel breaks torchvision's ops).
# The original `pydensecrf` sdist no longer builds; `pydensecrf2` provides the same
# `import pydensecrf` module.
INSTALL_REQUIRES = [
    "numpy>=1.26",
    "numba>=0.60",
    "zarr>=3.0",
    "numcodecs>=0.13",
    "dask[array]>=2024.8",
    "distributed>=2024.8",
    "fsspec>=2024.6",
    "torch>=2.9",
    "torchvision>=0.29",
    "pydensecrf2>=1.1",
    "tifffile>=2024.5",
    "pillow>=10",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "psutil>=5.9",
    # label PNGs inflate ~10x faster on zlib-ng than on zlib (isle_fast/stores/png.py)
    "zlib-ng>=0.5",
]

EXTRAS = {
    # numba.cuda compiles the GPU kernels with NVVM: from a CUDA toolkit when there is one,
    # else from this wheel (isle_fast/process.py points Numba at it).
    "gpu": ["cupy-cuda12x>=13", "nvidia-cuda-nvcc-cu12>=12.0"],
    # stores at s3:// URLs (and any S3-compatible server: AWS_ENDPOINT_URL)
    "s3": ["s3fs>=2024.6"],
    # moto's S3 server (tests/test_s3.py starts it on 127.0.0.1) and s3fs, so CI runs the bucket tests
    "dev": ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3", "ruff>=0.6", "mypy>=1.11", "s3fs>=2024.6",
            "moto[server]>=5.0"],
    # optional references timed by benchmarks/pipeline.py (skipped cleanly when absent)
    "bench": ["torchmetrics>=1.4", "SimpleITK>=2.3"],
}

setup(
    name="isle-fast",
    version="0.1.0",
    description="ISLE class-wise ensemble of weakly supervised segmentation pseudo-labels, "
    "as a fast chunked array pipeline (Zarr + Dask + Numba), with refinement and DeepLabV3+ training.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "isle_fast", "isle_fast.commands", "isle_fast.kernels", "isle_fast.stores",
        "isle_fast.refinement", "isle_fast.ensemble", "isle_fast.training", "isle_fast.synthetic",
        "isle_fast_benchmarks",
    ],
    # kernels/ and benchmarks/ stay at the top of the repository; installed, they are
    # isle_fast.kernels and isle_fast_benchmarks (`isle bench` from a wheel; results not included)
    package_dir={"isle_fast": "isle_fast", "isle_fast.kernels": "kernels", "isle_fast_benchmarks": "benchmarks"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["isle = isle_fast.cli:main"],
        "isle_fast.refinements": [],
    },
)
