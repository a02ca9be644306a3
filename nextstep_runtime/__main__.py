"""`python -m nextstep_runtime generate ...`"""

import sys

from .cli import main

sys.exit(main())
