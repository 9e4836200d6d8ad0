"""The machinery the stages share, in wings: each a subpackage whose docstring says what it
owns and which wings it may import. From the ground up: core, data, features, scale, probe,
assess, finetune, models; a wing imports only itself and the wings before it, and never a
stage (tests/test_layout.py holds both rules)."""
