"""Tests of tasks/lib, one module per library module."""
