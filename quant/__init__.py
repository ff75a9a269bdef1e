"""quant: the bottom floor of the model side. Quantization and everything that is pure arithmetic on
weights: the methods (layerwise.py and pipeline.py with the traits of methods.py; luc, mobilequant,
tender, gptq, smoothing), the integer kernels (kernels.py, native.py, csrc/), the runtime modules of
each weight format (qlinear.py), checkpoints with checksums (checkpoint.py) and their typed manifest
with all byte math (manifest.py), evaluation and sampling. Imports nothing of edgeweave but protos."""
