"""The trained model put to work: the model registry on git tags (GTO: register,
promote, read a version: `registry`), the ONNX export (`onnxexport`) and what predict and
export serve (`serving`). Imports every other wing.
"""
