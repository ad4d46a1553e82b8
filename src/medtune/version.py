"""The results version: which stored numbers a resumed store may reuse.

Bump `RESULTS_VERSION` whenever a change alters stored numbers (a metric's definition, the
predictions a cell writes, how a fold is split or trained). It is part of every cell's id, so a
rerun after a bump recomputes every cell instead of keeping numbers from older code, and it is
stored with each cell so `medtune results` / `report` can flag a store that mixes versions.

What each version changed: docs/report.md, "Results version".
"""

__version__ = "0.1.0"  # the package version (pyproject.toml); here so modules need not import the package

RESULTS_VERSION = 9

UNVERSIONED = 1  # what a cell without a recorded version counts as
