"""The pretrained backbones and their codes: building a timm or torchvision
backbone with its weights and preprocessing (`backbones`), computing codes of images in
batches (`extraction`) and the content-addressed HDF5 feature store (`store`). Imports core
and data.
"""
