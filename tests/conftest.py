import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests import their helpers (factories) by module name
