"""`python -m nextstep_runtime generate ...`"""

import sys

from .cli.main import main

sys.exit(main())
