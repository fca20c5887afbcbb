"""`python -m phi3v_tune ...` is the same as `phi3v-tune ...`."""

import sys

from .cli import main

sys.exit(main())
