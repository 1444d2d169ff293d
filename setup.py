from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(
    line.split('"')[1] for line in (here / "convnextv2_hf" / "__init__.py").read_text(encoding="utf-8").splitlines()
    if line.startswith("__version__")
)

extras = {
    "training": ["datasets>=3", "accelerate>=1.0", "evaluate>=0.4"],
    # `python -m convnextv2_hf.export` and `convnextv2_hf.deploy`: the dynamo ONNX export (onnx, onnxscript), the two
    # runtimes, and scikit-image for the sample photos the export verifies on
    "deploy": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18", "openvino>=2024.4", "scikit-image>=0.22"],
    # tests need the training and deploy stacks plus timm (parity), scikit-image (real photos), scikit-learn
    # (digits), peft (LoRA adapters on the block linears), setuptools >= 77 (the packaging test builds the wheel
    # offline) and parameterized (transformers' own model tests, `make transformers-suite`)
    "dev": [
        "pytest>=8",
        "timm>=1.0",
        "ruff>=0.5",
        "scikit-image>=0.22",
        "scikit-learn>=1.3",
        "peft>=0.13",
        "setuptools>=77",
        "parameterized>=0.9",
    ],
}
extras["dev"] = list(dict.fromkeys(extras["dev"] + extras["training"] + extras["deploy"]))  # scikit-image is in both
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="convnextv2-hf",
    version=version,
    description="ConvNeXt V2 with FCMAE masked image modeling for Hugging Face transformers",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # PEP 639: an SPDX expression (setuptools >= 77); the "License ::" classifier and free-text license are deprecated
    license_expression="MIT",
    packages=find_packages(include=["convnextv2_hf", "convnextv2_hf.*"]),
    # every non-Python file the package reads at run time: the ImageNet-1K label names and the model card template
    package_data={"convnextv2_hf": ["*.json", "*.md"]},
    python_requires=">=3.10",
    install_requires=[
        # the torch that CI tests (the lowest and only one: each other version is a multi-gigabyte download on the
        # machines this project is tested on); widen it only with a CI tier that installs the new lowest
        "torch>=2.14.1,<3",
        "torchvision>=0.29.1",
        "pillow>=10",
        "numpy>=1.24",
        # tested on 5.23 (`make test-lowest`) and 5.24; 5.17-5.22 register Auto classes and run processor hooks
        # otherwise (the built-in classes win, processor settings go unchecked): not admitted
        "transformers>=5.23,<6",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
    ],
    extras_require=extras,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
