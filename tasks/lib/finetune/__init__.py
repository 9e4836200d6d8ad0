"""Fine-tuning the network, one job per module, none touching a path: the
network (backbone and head together, `network`), the data (datasets, augmentation, loaders:
`data`), the optimizer and schedule (`optim`), what a checkpoint holds and when to resume
(`resume`) and the training loop (`loop`). tasks/finetune.py reads and writes every file.
Imports the wings below it (core to assess).
"""
