"""Runtime: the package format, the session that serves the host library's PIM calls, the crossbar
simulator and verification.  Loading and decoding a package never loads its host library; running it does."""

from .package import Package, PackageError, load
from .session import MODES, Session

__all__ = ["MODES", "Package", "PackageError", "Session", "load"]
