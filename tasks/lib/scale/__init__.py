"""Work spread over processes and machines: torch DDP for fine-tuning (`ddp`), the
torchrun launcher it runs under (`torchrun`) and extraction sharded on a Dask cluster
(`sharding`). Imports core, data and features.
"""
