"""Integration tier (-m slurm). A package, so that its conftest does not shadow tests/conftest.py
for the modules that `from conftest import ...`."""
