"""The machinery the stages share. It never imports a stage (tests/test_layout.py)."""
