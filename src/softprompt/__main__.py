"""`python -m softprompt` is the same command as `softprompt`."""

import sys

from softprompt.cli import main

sys.exit(main())
