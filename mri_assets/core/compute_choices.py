"""What a compute setting may say, without importing torch: devices, precisions, backbone
architectures (with their embedding width) and weights.

`embed`, `precision` and `backbone` act on these and take them from here, so a setting can be
checked where torch is not loaded: the code location, which every Dagster run worker imports
before its first step (`resources.compute.ComputeResource`).
"""

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ARCHS = {"resnet18": 512, "resnet50": 2048}
WEIGHTS = ("none", "imagenet")
