"""``python scripts/eval/workloads [names...]`` or ``cd scripts/eval && python -m workloads [names...]``."""
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a directory: put scripts/eval on sys.path, import the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from workloads import main  # noqa: E402

sys.exit(main())
