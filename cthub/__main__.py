import sys

from cthub.cli import main

sys.exit(main())
